"""Bringing each state-dict entry, whole, to the rank that writes it.

Every rank sends what it holds of an entry straight to the entry's writer, point to point, into the place it takes
in the writer's buffer of the whole tensor; a round's transfers all run at once (one round: one shard per writer),
so writers receive in parallel and nobody else holds anything extra:

- ``zero``: a ZeRO-3 partitioned dense weight. Partition i of the parameter's partition group (every rank) holds
  elements [i * size, (i + 1) * size) of the flattened tensor (DeepSpeed's partitioning, the layout its own
  `zero_to_fp32` reads back); each rank sends the part of its partition that is not padding.
- ``expert-zero``: an expert shard partitioned by ZeRO-3 over its expert-data-parallel group: the rows of EP rank e
  are partitioned over ranks {e, e + ep, ...}; every rank sends its partition of its EP rank's rows.
- ``expert-local``: an expert shard held whole by each rank (the model as transformers returned it, or not yet
  given to DeepSpeed): the ranks of the writer's EP group send their rows.
- ``whole``: every rank holds all of it (buffers, replicated weights of a model DeepSpeed has not partitioned):
  the writer takes its own.
- ``gathered``: what this path cannot read directly (ZeRO-3 partitions offloaded to NVMe or quantized, DTensors
  sharded otherwise): DeepSpeed's `GatheredParameters` or the DTensor's `full_tensor()` on every rank, as the
  previous export did (it needs twice the tensor on every rank for a moment), then as ``whole`` / ``expert-local``.

The route of every entry is decided in the plan (`plan.route_of`) and agreed by every rank before anything moves.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ...errors import ExportError
from ..record import EPModelRecord
from .plan import Entry

EXPERT_ROUTES = ("expert-zero", "expert-local")


def bring(items, record: EPModelRecord) -> dict[str, torch.Tensor]:
    """`items`: (name, tensor, entry, writer, tag) of one round, the same list on every rank. Returns this rank's
    entries as writer, whole, on the host."""
    rank = dist.get_rank()
    received, pending, sending = {}, [], []
    for name, tensor, entry, writer, tag in items:
        mine = None
        if entry.route == "gathered":
            _wait(pending)  # a collective comes after the transfers already posted, on every rank alike
            mine = _collectively_gathered(tensor, entry)
            if not entry.expert_shard:
                if rank == writer:
                    received[name] = mine
                continue
        elif entry.route == "whole":
            if rank == writer:
                received[name] = _local(tensor)
            continue
        pieces = _pieces(entry, tensor, record, writer)
        if rank == writer:
            whole = torch.empty(entry.numel, dtype=entry.dtype, device=_device(tensor))
            for source, offset, length in pieces:
                into = whole.narrow(0, offset, length)
                if source == rank:
                    into.copy_(_own_piece(entry, tensor, length, mine))
                else:
                    pending.append(dist.irecv(into, src=source, tag=tag))
            received[name] = whole.view(entry.shape)
        else:
            for source, _, length in pieces:
                if source == rank:
                    piece = _own_piece(entry, tensor, length, mine)
                    sending.append(piece)  # alive until sent
                    pending.append(dist.isend(piece, dst=writer, tag=tag))
    _wait(pending)
    sending.clear()
    return {name: value.cpu() for name, value in received.items()}


def _wait(pending: list) -> None:
    for work in pending:
        work.wait()
    pending.clear()


def _device(tensor) -> torch.device:
    """Where the pieces travel: where this rank holds them (a partition offloaded to the host goes through the
    accelerator when the backend cannot send host memory, as NCCL cannot)."""
    source = getattr(tensor, "ds_tensor", None)
    source = tensor.to_local() if isinstance(tensor, DTensor) else (source if source is not None else tensor)
    if source.device.type == "cpu" and "nccl" in str(dist.get_backend()):
        from ...distributed import default_device_type

        accelerator = getattr(torch, default_device_type())
        return torch.device(default_device_type(), accelerator.current_device())
    return source.device


def _local(tensor) -> torch.Tensor:
    value = tensor.detach()
    return value.to_local() if isinstance(value, DTensor) else value


def _pieces(entry: Entry, tensor, record: EPModelRecord, writer: int) -> list[tuple[int, int, int]]:
    """(source rank, offset in the flattened whole tensor, length) of every piece of `entry`."""
    ep = len(record.ep_ranks)
    if entry.route == "zero":
        size = tensor.ds_tensor.ds_numel
        return [(source, i * size, n) for i, source in enumerate(range(dist.get_world_size()))
                if (n := _valid(entry.numel, i, size))]
    rows = entry.numel // ep  # elements of one EP rank's experts
    if entry.route == "expert-zero":
        size = tensor.ds_tensor.ds_numel
        return [(replica * ep + e, e * rows + replica * size, n) for e in range(ep)
                for replica in range(dist.get_world_size() // ep) if (n := _valid(rows, replica, size))]
    first = writer - writer % ep  # the writer's EP group: ep consecutive ranks (checked by the plan)
    return [(first + e, e * rows, rows) for e in range(ep)]


def _valid(numel: int, index: int, size: int) -> int:
    """How much of partition `index` (of `size` elements) is the tensor's, not padding."""
    return max(0, min(size, numel - index * size))


def _own_piece(entry: Entry, tensor, length: int, gathered) -> torch.Tensor:
    if entry.route in ("zero", "expert-zero"):
        return tensor.ds_tensor.detach().narrow(0, 0, length).to(_device(tensor))
    source = gathered if gathered is not None else _local(tensor)
    return source.contiguous().view(-1)


def _collectively_gathered(tensor, entry: Entry) -> torch.Tensor:
    """The ``gathered`` route: what every rank of the tensor's group gathers together (twice its size, briefly)."""
    value = tensor.detach()
    if isinstance(value, DTensor):
        return value.full_tensor()
    import deepspeed  # a ZeRO-3 parameter this path cannot read directly

    with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
        value = tensor.detach()
    # DeepSpeed releases a gathered parameter by pointing it at an empty tensor: the buffer lives on while referred to
    if value.untyped_storage().nbytes() < value.numel() * value.element_size():
        raise ExportError(
            f"{entry.name}: DeepSpeed released the gathered tensor in place before it was written (this DeepSpeed "
            "release frees gathered parameters differently); nothing was moved into the target directory."
        )
    return value
