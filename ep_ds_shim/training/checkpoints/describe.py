"""What a checkpoint records about the engine that wrote it, read from the live engine: the model (every parameter's
full shape), the optimizer's parameter groups, and ZeRO-3's partition structure.

The partition structure is DeepSpeed's (`DeepSpeedZeroOptimizer_Stage3`): its parameters are split into sub-groups,
each partitioned over one process group (every rank for dense weights; the expert-data-parallel group for an expert
shard, `expert_groups.py`). A rank's flat fp32 copy and Adam moments of a sub-group are its partitions of those
parameters, one after the other, each `ceil(numel / partition_count)` long (the last one padded). That is what
DeepSpeed's own converter (`deepspeed/checkpoint/ds_to_universal.py`) assumes too.
"""

from __future__ import annotations

from ..expert_groups import EXPERT_FAMILY

# Optimizer hyperparameters a record can carry (JSON): numbers, flags, strings and tuples of them (AdamW's betas)
_SCALARS = (bool, int, float, str, type(None))


def precision(engine) -> str:
    return "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"


def model(engine, record) -> dict:
    """{"class", "parameters": {name: full shape}, "expert_rows"}: expert tensors with every EP rank's rows."""
    parameters = {}
    for name, param in engine.module.named_parameters():
        shape = [int(dim) for dim in getattr(param, "ds_shape", param.shape)]
        if name in record.expert_rows:
            shape[0] = int(record.expert_rows[name])
        parameters[name] = shape
    return {"class": type(engine.module).__name__, "parameters": parameters,
            "expert_rows": {name: int(rows) for name, rows in record.expert_rows.items()}}


def optimizer(engine) -> dict:
    """The base optimizer's class and each parameter group's hyperparameters (not its parameters)."""
    base = engine.optimizer.optimizer
    groups = [{key: _jsonable(value) for key, value in group.items() if key != "params" and _carried(value)}
              for group in base.param_groups]
    return {"class": type(base).__name__, "param_groups": len(groups), "hyperparameters": groups}


def _carried(value) -> bool:
    return isinstance(value, _SCALARS) or (isinstance(value, (tuple, list)) and all(isinstance(v, _SCALARS) for v in value))


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def partitions(engine) -> tuple[list[dict], list[int]]:
    """ZeRO-3's sub-groups on this rank: [{partition_count, param_group, expert, params: [[name, shape, partition
    numel]]}], and
    this rank's partition rank in each. Raises if DeepSpeed's flat buffers are not laid out as described above."""
    zero = engine.optimizer
    names = engine.param_names
    groups, ranks = [], []
    for index, params in enumerate(zero.fp16_groups):
        families = {getattr(param, "ds_zero_placement_family", "replicated") for param in params}
        entries = [[names[param], [int(dim) for dim in param.ds_shape], int(param.partition_numel())]
                   for param in params]
        flat = zero.fp32_partitioned_groups_flat[index]
        if not engine.zero_nvme_offload_optimizer() and sum(entry[2] for entry in entries) != flat.numel():
            raise RuntimeError(
                f"ZeRO-3 sub-group {index} holds {flat.numel()} fp32 elements on this rank, not the sum of its "
                "parameters' partitions: this DeepSpeed lays out its flat buffers differently from the one ep-ds-shim "
                "was verified with, so the checkpoint could not be converted to another layout")
        groups.append({"partition_count": int(zero._get_sub_group_partition_count(index)),
                       "param_group": int(zero.sub_group_to_group_id[index]),
                       "expert": families == {EXPERT_FAMILY}, "params": entries})
        ranks.append(int(zero._get_sub_group_partition_rank(index)))
    return groups, ranks
