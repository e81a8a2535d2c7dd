"""The whole state dict on global rank 0: what DeepSpeed's 16-bit consolidation returns (`save_16bit_model`,
accelerate's `get_state_dict` / `save_model`) and what the Trainer's `save_model` writes, made EP-aware.

Rank 0 holds the whole model in CPU memory, as DeepSpeed's own consolidation does; every other rank at most one
gathered tensor at a time. `ep_ds_shim.save_pretrained` does not use it: it streams (`stream.py`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ... import experts
from ..record import record_of, unwrap


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
