"""DeepSpeed's own expert parameter groups, applied to the experts transformers sharded.

ZeRO-3 partitions every parameter over DeepSpeed's data-parallel group, which without an ``mpu`` is every rank,
and that is what dense weights need. An expert shard must instead be partitioned over the ranks holding the *same*
experts, its expert-data-parallel group ``{e, e+ep, e+2ep, ...}``. DeepSpeed 0.19.3+ already knows such parameters:
its AutoEP experts carry

- ``allreduce = False`` and ``group_name``: DeepSpeed's MoE-parameter markers (`deepspeed.moe.utils.is_moe_param`),
  so its initial broadcast of the model runs over the expert-data-parallel group `group_name` names;
- ``ds_zero_placement_family = "autoep_expert"`` and ``ds_zero_partition_group_name``: ZeRO-3 then averages their
  gradients over the data-parallel world (right when every rank feeds its own tokens, as `token_dispatch` makes
  them) and counts each expert once in the gradient norm (`stage3.py`: `_gradient_averaging_world_size`,
  `_grad_norm_counts_every_rank`, and the expert-parallel all-reduce of the norm);
- ``ds_zero_partition_process_group``: the group `zero.Init` partitions the parameter over.

The groups are DeepSpeed's, built by its `groups._create_expert_and_data_parallel` (named ``ep_size_<N>``, EP groups
of consecutive ranks), from DeepSpeed's own per-module hook `set_deepspeed_parallelism`, the place its MoE layers
build them too (`training/guard.py` installs that hook on the model instance).
"""

from __future__ import annotations

import torch.distributed as dist

from .. import experts
from ..errors import DeepSpeedGroupsError, UnsupportedReleaseError
from ..releases.support import VERIFIED_DEEPSPEED

# DeepSpeed's tags for an expert parameter partitioned over its expert-data-parallel group (AutoEP's family).
EXPERT_FAMILY = "autoep_expert"


def group_name(ep_size: int) -> str:
    """The name DeepSpeed gives the expert groups of EP size `ep_size`."""
    return f"ep_size_{ep_size}"


def require_expert_placement(deepspeed) -> None:
    """Refuse a DeepSpeed without per-parameter ZeRO-3 placement (before 0.19.3), whatever the opt-in: its ZeRO-3
    would partition each expert shard over every rank, overwriting the other ranks' experts with one rank's."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    if not hasattr(DeepSpeedEngine, "_resolve_zero3_param_placement"):
        raise UnsupportedReleaseError(
            f"DeepSpeed {getattr(deepspeed, '__version__', '?')} has no per-parameter ZeRO-3 placement "
            "(`DeepSpeedEngine._resolve_zero3_param_placement`, DeepSpeed 0.19.3 and newer), which ep-ds-shim uses to "
            "partition each expert shard over the ranks holding the same experts; it would partition them over every "
            f"rank and mix different ranks' experts. Install a verified release: pip install "
            f"'deepspeed{VERIFIED_DEEPSPEED}' (DS_BUILD_OPS=0 on CPU)."
        )


def tag_expert_parameters(model, ep_size: int) -> None:
    """Mark every expert shard as DeepSpeed marks an AutoEP expert (the partition group is set once DeepSpeed's
    groups exist, in `create_groups`)."""
    name = group_name(ep_size)
    for param in experts.expert_parameters(model).values():
        param.allreduce = False
        param.group_name = name
        param.ds_zero_placement_family = EXPERT_FAMILY
        param.ds_zero_partition_group_name = name


def create_groups(model, record, *, use_data_before_expert_parallel: bool = False) -> None:
    """Inside `deepspeed.initialize` (DeepSpeed's `set_deepspeed_parallelism` hook): build DeepSpeed's expert groups for
    the model's EP size, check they are the EP group the model was loaded with, and point every expert shard's ZeRO-3
    partition at its expert-data-parallel group. Raises before DeepSpeed broadcasts or partitions anything."""
    from deepspeed.utils import groups  # only reached inside deepspeed.initialize

    world = dist.get_world_size()
    data_parallel = sorted(dist.get_process_group_ranks(groups._get_data_parallel_group()))
    if data_parallel != list(range(world)):
        raise DeepSpeedGroupsError(
            f"deepspeed.initialize would use data-parallel group {data_parallel}, not every rank: it was given an "
            "`mpu` (or a sequence-parallel set-up). ep-ds-shim 0.3 partitions dense weights over all ranks and "
            "experts over their expert-data-parallel group with DeepSpeed's own expert groups, so DeepSpeed must "
            "get no `mpu` (nothing has been changed yet). Call `ep_ds_shim.initialize(model=..., layout=layout, "
            "...)` without `mpu`, or `deepspeed.initialize(...)` without `mpu` inside "
            "`ep_ds_shim.supply_deepspeed_groups(layout)`."
        )
    name = group_name(record.ep_size)
    groups._create_expert_and_data_parallel(
        record.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel)
    ep_ranks = sorted(dist.get_process_group_ranks(groups._get_expert_parallel_group(name)))
    if ep_ranks != sorted(record.ep_ranks):
        raise DeepSpeedGroupsError(
            f"DeepSpeed's expert-parallel group {name} for this rank is {ep_ranks}, but the model was loaded with "
            f"expert-parallel group {list(record.ep_ranks)} (EP groups of consecutive ranks). Do not set "
            "`use_data_before_expert_parallel_` in the DeepSpeed config; nothing has been changed yet."
        )
    partition = groups._get_expert_data_parallel_group(name)
    for param in experts.expert_parameters(model).values():
        param.ds_zero_partition_process_group = partition


def expert_data_parallel_ranks(record) -> list[int]:
    """The ranks holding the same experts as this one: ``{e, e+ep, ...}``."""
    rank, world, ep = dist.get_rank(), dist.get_world_size(), record.ep_size
    return list(range(rank % ep, world, ep))
