"""Export: the trained EP model as one standard checkpoint, written by transformers' own `save_pretrained`.

`save_pretrained(engine_or_model, directory, **kwargs)` is called on every rank. Tensor by tensor it gathers the
ZeRO-3 partitions (over each parameter's data-parallel group) and the expert shards of the first data-parallel
replica's EP group (to global rank 0); every other rank holds at most one gathered tensor at a time, rank 0 the
full state dict in CPU memory (as DeepSpeed's own 16-bit consolidation does). Rank 0 then calls the model class's
`save_pretrained(state_dict=full)` with the model's `distributed_config` hidden, so transformers takes its
single-process path: its reverse weight conversion (the key layout the release writes), safetensors sharded by
`max_shard_size`, and a config without the distributed settings (docs/design.md, "Saving").

The same gather backs the EP-aware save paths of an engine (`engine_paths.py`) and the model's own
`save_pretrained` once it is DeepSpeed-ready (`SavePretrainedGuard`).
"""

from __future__ import annotations

import contextlib
import json
import os
import weakref

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .. import experts
from ..distributed import exchange, initialised
from ..errors import EpShimError, IncompleteSaveError
from .record import EPModelRecord, record_of, unwrap

_DECIDED_HERE = ("state_dict", "is_main_process", "distributed_checkpoint")


def gather_full_state_dict(model_or_engine, *, exclude_frozen_parameters: bool = False) -> dict | None:
    """Collective on every rank: the full state dict (module key names, every expert) on global rank 0, None on
    the others. Non-zero ranks hold at most one gathered tensor at a time."""
    import deepspeed  # only reached once DeepSpeed is in use; the loading side never imports it

    model = unwrap(model_or_engine)
    record = record_of(model)
    rank = dist.get_rank()
    in_first_replica = 0 in record.ep_ranks  # the EP group that holds global rank 0 sends its shards there
    ep_group = record.ep_group()
    entries = model.state_dict(keep_vars=True)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    full: dict | None = {} if rank == 0 else None
    seen: dict[int, str] = {}
    for name, tensor in entries.items():
        if id(tensor) in seen:  # tied weights: gathered once, aliased (transformers drops the duplicate itself)
            if full is not None:
                full[name] = full[seen[id(tensor)]]
            continue
        seen[id(tensor)] = name
        is_parameter = name in parameters
        if exclude_frozen_parameters and is_parameter and not tensor.requires_grad:
            continue
        partitioned = is_parameter and hasattr(tensor, "ds_id")
        gather = deepspeed.zero.GatheredParameters([tensor], modifier_rank=None) if partitioned else contextlib.nullcontext()
        with gather:
            value = _whole(tensor, experts.is_expert_parameter_name(name), in_first_replica, ep_group)
        if full is not None:
            full[name] = value
    return full


def _whole(tensor, is_expert: bool, in_first_replica: bool, ep_group):
    """One tensor (ZeRO-3 partitions already gathered), whole, on global rank 0 as a CPU copy; None elsewhere."""
    value = tensor.detach()
    if isinstance(value, DTensor):  # a model as transformers returned it: its own mesh collective
        value = value.full_tensor()
    elif is_expert and in_first_replica:
        value = value.contiguous()
        parts = [torch.empty_like(value) for _ in range(dist.get_world_size(ep_group))] if dist.get_rank() == 0 else None
        dist.gather(value, parts, dst=0, group=ep_group)
        value = torch.cat(parts, dim=0) if parts is not None else value
    return value.cpu().clone() if dist.get_rank() == 0 else None


# Writing a large model can take long on the writing rank while the others wait for its outcome; a rank that dies
# ends the job through the launcher anyway, so this wait is bounded only generously.
WRITE_TIMEOUT = 24 * 3600.0


def agree_on_outcome(error: str | None, what: str) -> None:
    """Every rank raises the same error if any rank's part failed, so none is left waiting in a collective."""
    outcomes = exchange("save_outcome", {"error": error}, what=what, timeout=WRITE_TIMEOUT)
    failed = {rank: outcome["error"] for rank, outcome in outcomes.items() if outcome["error"]}
    if failed:
        rank, message = next(iter(sorted(failed.items())))
        raise EpShimError(f"{what} failed on rank(s) {sorted(failed)}; nothing usable was written. Rank {rank}: {message}")


# What makes transformers' `save_pretrained` treat a model as distributed: the config's `distributed_config` (5.15+:
# gathers, distributed checkpoints, a closing world barrier) and the model's `_tp_size` (5.6-5.14: gathers).
_DISTRIBUTED_MARKERS = (("config", "distributed_config"), ("model", "_tp_size"))


@contextlib.contextmanager
def single_process_save(model):
    """While `save_pretrained` writes a state dict that is already whole, hide what makes it distributed, so it takes
    its plain single-process path on the one rank that calls it."""
    owners = {"config": model.config, "model": model}
    hidden = {(owner, name): vars(owners[owner]).pop(name) for owner, name in _DISTRIBUTED_MARKERS
              if name in vars(owners[owner])}
    try:
        yield
    finally:
        for (owner, name), value in hidden.items():
            setattr(owners[owner], name, value)


def save_pretrained(engine_or_model, save_directory, **save_pretrained_kwargs) -> None:
    """Write the whole EP model as a standard transformers checkpoint. Call on every rank.

    Args:
        engine_or_model: the DeepSpeed engine (or the model) of an EP model loaded inside `ep_zero3_compat`.
        save_directory: where global rank 0 writes it.
        **save_pretrained_kwargs: passed to transformers' `save_pretrained` (e.g. ``max_shard_size``,
            ``safe_serialization``); ``state_dict``, ``is_main_process`` and ``distributed_checkpoint`` are decided
            here.

    Plain single-process `from_pretrained(save_directory)` loads it, and so does an EP load of any EP size.
    """
    for name in _DECIDED_HERE:
        if name in save_pretrained_kwargs:
            raise TypeError(f"ep_ds_shim.save_pretrained decides {name!r} itself; do not pass it")
    if not initialised():
        raise EpShimError("ep_ds_shim.save_pretrained needs the initialised process group of the training job")
    model = unwrap(engine_or_model)
    full = gather_full_state_dict(model)
    error = None
    if full is not None:
        try:
            with single_process_save(model):
                # the class's own method: the instance guard on a DeepSpeed-ready model is not entered again
                type(model).save_pretrained(model, save_directory, state_dict=full, is_main_process=True,
                                            **save_pretrained_kwargs)
            _restate_total_parameters(model, save_directory, full)
        except Exception as failure:  # noqa: BLE001 - shared with every rank below
            error = f"{type(failure).__name__}: {failure}"
    agree_on_outcome(error, f"ep_ds_shim.save_pretrained({save_directory!r})")


def _restate_total_parameters(model, save_directory, full: dict) -> None:
    """transformers writes `num_parameters()` of the live model into a sharded checkpoint's index: 0 under ZeRO-3
    (partitioned) and one rank's experts under EP. State the exported model's count instead."""
    index = os.path.join(save_directory, "model.safetensors.index.json")
    if not os.path.exists(index):
        return
    names = {name for name, _ in model.named_parameters()}  # tied weights once
    with open(index) as handle:
        data = json.load(handle)
    data.setdefault("metadata", {})["total_parameters"] = sum(full[n].numel() for n in names if n in full)
    with open(index, "w") as handle:
        handle.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def shard_only_entries(state_dict: dict, record: EPModelRecord) -> list[str]:
    """The expert entries of `state_dict` that hold only one rank's shard instead of every expert."""
    return [
        name for name, value in state_dict.items()
        if name in record.expert_rows and getattr(value, "ndim", 0) > 0 and value.shape[0] != record.expert_rows[name]
    ]


class SavePretrainedGuard:
    """`model.save_pretrained` of a DeepSpeed-ready EP model (its weights are this rank's local shards, which
    transformers would write as if they were the whole model):

    - no ``state_dict``: the collective export (every rank calls it, as transformers already requires for a model
      sharded at load time);
    - a ``state_dict`` with every expert (e.g. what the EP-aware engine consolidation gives rank 0 in the Trainer or
      accelerate): written by transformers on the calling rank alone, no barrier, so rank-0-only callers do not hang;
    - a ``state_dict`` holding one rank's expert shard, or ``distributed_checkpoint=True``: a clear error.
    """

    def __init__(self, model):
        self.model = weakref.ref(model)

    def __call__(self, save_directory, **kwargs):
        model = self.model()
        record = record_of(model)
        if kwargs.get("distributed_checkpoint"):
            raise IncompleteSaveError(
                "save_pretrained(distributed_checkpoint=True) of an EP model under DeepSpeed would write each rank's "
                "expert shard as if it were the whole tensor. Call ep_ds_shim.save_pretrained(engine, dir) on every "
                "rank for a standard checkpoint, or engine.save_checkpoint(dir) for a resumable one."
            )
        state_dict = kwargs.get("state_dict")
        if state_dict is None:
            kwargs.pop("is_main_process", None)  # the export decides who writes
            kwargs.pop("distributed_checkpoint", None)
            return save_pretrained(model, save_directory, **kwargs)
        partial = shard_only_entries(state_dict, record)
        if partial:
            raise IncompleteSaveError(
                f"save_pretrained was given a state dict that holds only this rank's expert shard ({partial[0]}: "
                f"{state_dict[partial[0]].shape[0]} of {record.expert_rows[partial[0]]} experts); nothing was "
                "written. Call ep_ds_shim.save_pretrained(engine, dir) on every rank (or use ep_ds_shim.EPTrainer)."
            )
        with single_process_save(model):
            return type(model).save_pretrained(model, save_directory, **kwargs)
