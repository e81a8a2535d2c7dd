"""One state-dict entry, whole, on the rank that writes it. A collective: every rank calls `fetch` for every entry,
in the same order.

- ZeRO-3 partitions: DeepSpeed's own `GatheredParameters` over the parameter's partition group (every rank for a
  dense weight, the expert-data-parallel group for an expert shard).
- Expert shards held as plain local tensors: sent point to point within the EP group that holds the writer,
  straight into their rows of one preallocated whole tensor; the other EP groups do not take part.
- DTensors (the model as transformers returned it): `full_tensor()`, the DTensor's own mesh collective.

The writer keeps the result on the host: on CPU the gathered buffer itself (DeepSpeed releases a gathered
parameter by pointing it at an empty tensor, so the buffer lives on while the writer refers to it), on an
accelerator one host copy. Every other rank drops what it gathered before the next entry.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ...errors import ExportError
from ..record import EPModelRecord
from .plan import Entry


def fetch(tensor, entry: Entry, *, writer: int, record: EPModelRecord) -> torch.Tensor | None:
    """The whole value of `entry` on global rank `writer` (on the host), None on every other rank."""
    rank = dist.get_rank()
    gather = contextlib.nullcontext()
    if hasattr(tensor, "ds_id"):
        import deepspeed  # a ZeRO-3 parameter: DeepSpeed is in use

        gather = deepspeed.zero.GatheredParameters([tensor], modifier_rank=None)
    with gather:
        value = tensor.detach()
        if isinstance(value, DTensor):
            value = value.full_tensor()
        elif entry.expert_shard:
            value = _gather_experts(value, writer, record)
        value = value.cpu() if rank == writer else None
    if value is not None and value.untyped_storage().nbytes() < value.numel() * value.element_size():
        raise ExportError(
            f"{entry.name}: the gathered tensor was released by DeepSpeed before it was written (this DeepSpeed "
            "release frees gathered parameters in place); nothing was moved into the target directory."
        )
    return value


def _gather_experts(local: torch.Tensor, writer: int, record: EPModelRecord) -> torch.Tensor:
    """Every EP rank's rows of one expert tensor, in EP-rank order, on `writer`; ranks of other EP groups skip it.

    Point to point, each peer's rows received straight into their place in the whole tensor: a `dist.gather`
    (gloo) would stage the whole tensor once more in a flat buffer of its own."""
    if writer not in record.ep_ranks:
        return local
    local = local.contiguous()
    group = record.ep_group()
    if dist.get_rank() != writer:
        dist.send(local, dst=writer, group=group)
        return local
    whole = torch.empty((local.shape[0] * len(record.ep_ranks), *local.shape[1:]), dtype=local.dtype,
                        device=local.device)
    rows = dict(zip(record.ep_ranks, whole.chunk(len(record.ep_ranks))))  # EP rank order = the experts' order
    receiving = [dist.irecv(rows[peer], src=peer, group=group) for peer in record.ep_ranks if peer != writer]
    rows[writer].copy_(local)
    for work in receiving:
        work.wait()
    return whole
