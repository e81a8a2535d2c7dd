"""Reading a checkpoint's ZeRO-3 optimizer states and putting whole parameters back together.

Each rank's optimizer-states file holds, per ZeRO-3 sub-group, its flat fp32 partition and Adam moments. They are
read with `torch.load(weights_only=True, mmap=True)`: no code from the file runs (only tensors, containers and
DeepSpeed's two plain-data classes in these files, its loss scaler and ZeRO stage enum, are accepted) and a parameter
costs memory only when it is put together. Which slice of which rank's buffer holds which part of a parameter comes
from the checkpoint's JSON record (`manifest.py`, `describe.partitions`).
"""

from __future__ import annotations

import math
import os

import torch

OPTIMIZER_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


def _allowed_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [LossScaler, DynamicLossScaler, ZeroStageEnum]


def load_optimizer_states(path) -> dict:
    """One rank's optimizer-states file, memory-mapped, without unpickling code."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # noqa: BLE001 - named below
        raise ValueError(
            f"{path} could not be read as DeepSpeed ZeRO-3 optimizer states without unpickling arbitrary objects "
            f"(torch.load(weights_only=True): {type(error).__name__}: {str(error)[:300]})") from None


def state_indices(partitions: list[dict]) -> list[int]:
    """For each ZeRO-3 sub-group, its index in the base optimizer's state dict: DeepSpeed appends each sub-group's
    flat fp32 partition to its parameter group in sub-group order, and a state dict numbers them group by group."""
    order = sorted(range(len(partitions)), key=lambda index: (partitions[index]["param_group"], index))
    return [order.index(index) for index in range(len(partitions))]


def flat_state(states: dict, sub_group: int, state_index: int, key: str) -> torch.Tensor:
    zero = states["optimizer_state_dict"]
    if key == "fp32":
        return zero["fp32_flat_groups"][sub_group]
    return zero["optimizer_state_dict"]["state"][state_index][key]


class Assembler:
    """Puts whole parameters together from every rank's optimizer states (`record`: the checkpoint's manifest)."""

    def __init__(self, record: dict, tag_dir: str):
        self.record = record
        self.tag_dir = tag_dir
        self.indices = state_indices(record["partitions"])
        self._states: dict[int, dict] = {}
        self.where = {}  # parameter name -> (sub-group, offset of its partition in the sub-group's flat buffers)
        for group_index, group in enumerate(record["partitions"]):
            offset = 0
            for name, _, numel in group["params"]:
                self.where[name] = (group_index, offset)
                offset += numel

    def states(self, rank: int) -> dict:
        if rank not in self._states:
            name = self.record["ranks"][rank]["files"]["optim_states"]["name"]
            self._states[rank] = load_optimizer_states(os.path.join(self.tag_dir, name))
        return self._states[rank]

    def whole(self, name: str, key: str) -> torch.Tensor:
        """The parameter `name`'s whole `key` state (fp32 weights or an Adam moment), every EP rank's experts
        included (concatenated on dim 0 in EP-rank order)."""
        group_index, offset = self.where[name]
        group = self.record["partitions"][group_index]
        _, shape, partition_numel = next(entry for entry in group["params"] if entry[0] == name)
        numel = math.prod(shape)
        holders: dict[int, dict[int, int]] = {}  # replica (EP rank for experts, else 0) -> partition rank -> rank
        for entry in self.record["ranks"]:
            replica = entry["ep_rank"] if group["expert"] else 0
            holders.setdefault(replica, {}).setdefault(entry["partition_ranks"][group_index], entry["rank"])
        pieces = []
        for replica in sorted(holders):
            ranks = holders[replica]
            if sorted(ranks) != list(range(group["partition_count"])):
                raise ValueError(f"{name}: partitions {sorted(ranks)} of {group['partition_count']} were written for "
                                 f"{'EP rank ' + str(replica) if group['expert'] else 'the dense weights'}")
            fragments = []
            for partition_rank in range(group["partition_count"]):
                flat = flat_state(self.states(ranks[partition_rank]), group_index, self.indices[group_index], key)
                length = max(0, min(partition_numel, numel - partition_rank * partition_numel))
                fragments.append(flat.narrow(0, offset, length))
            pieces.append(torch.cat(fragments).view(shape))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)  # torch.cat copies: no file mapping kept

    def step(self) -> torch.Tensor:
        """Adam's step count (the same in every sub-group)."""
        zero = self.states(0)["optimizer_state_dict"]
        return zero["optimizer_state_dict"]["state"][0]["step"]

    def global_state(self) -> dict:
        """What DeepSpeed's universal ZeRO-3 loader reads from ``zero/optimizer_state.pt``: the loss scaler and the
        step and parameter groups of the base optimizer (rank 0's; the same on every rank)."""
        zero = self.states(0)["optimizer_state_dict"]
        groups = zero["optimizer_state_dict"]["param_groups"]
        kept = {key: zero[key] for key in ("zero_stage", "loss_scaler", "dynamic_loss_scale", "overflow") if key in zero}
        return {**kept, "optimizer_state_dict": {"state": {0: {"step": self.step().clone()}}, "param_groups": groups},
                "param_groups": groups}
