"""Finding a model's expert weights, and fingerprinting them so a clobbered shard is caught.

Every transformers 5.x MoE family keeps its routed experts as fused 3-D (or 2-D bias) tensors in a module
named ``experts`` (``mlp.experts.gate_up_proj`` and friends), indexed by expert on dim 0. Shared experts
live in differently named modules (``shared_expert``, ``shared_experts``) and are dense, so they are not
matched.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

EXPERT_MODULE_NAME = "experts"
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def num_experts_of(config) -> int | None:
    """The routed-expert count declared by a model config (its text config for multimodal models)."""
    configs = [config]
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        configs.insert(0, get_text_config())
    for candidate in configs:
        for key in _EXPERT_COUNT_KEYS:
            value = getattr(candidate, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def ep_plan_of(model_class, config) -> dict:
    """The EP plan a model would use: the config's ``base_model_ep_plan`` (text config included) or the class's."""
    plan = {}
    configs = [config]
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        configs.append(get_text_config())
    for candidate in configs:
        plan.update(getattr(candidate, "base_model_ep_plan", None) or {})
    plan.update(getattr(model_class, "_ep_plan", None) or {})
    return plan


def is_expert_parameter_name(name: str) -> bool:
    """``model.layers.3.mlp.experts.down_proj`` -> True; ``...shared_expert.down_proj`` -> False."""
    return EXPERT_MODULE_NAME in name.split(".")[:-1]


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this rank holds (a DTensor's local shard, else the tensor itself)."""
    to_local = getattr(param, "to_local", None)
    return to_local() if callable(to_local) else param


def expert_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: param for name, param in model.named_parameters() if is_expert_parameter_name(name)}


# Fingerprints read a fixed sample of every expert: _BLOCKS runs of _BLOCK contiguous elements spread evenly over the
# expert's slice (all of it when it is shorter). What the guard must catch (a shard clobbered by another rank's,
# experts swapped or shifted) changes every expert throughout, so a few hundred values per expert see it. Contiguous
# runs matter for the cost: an earlier sample of every 61st element still touched every cache line and page of the
# shard and cost 3-4% of a 1.5 GB load per call (benchmarks/, profile section); runs touch a few lines per expert.
# It is not meant to catch a single flipped bit.
_BLOCK = 64
_BLOCKS = 8
_PERIOD = 1009


@functools.lru_cache(maxsize=64)
def _columns(width: int, device: torch.device) -> torch.Tensor:
    """The sampled positions within one expert's slice of `width` elements (a model has a handful of widths)."""
    starts = [(width - _BLOCK) * block // (_BLOCKS - 1) for block in range(_BLOCKS)]
    return torch.tensor([start + offset for start in starts for offset in range(_BLOCK)], device=device)


def _sample(tensor: torch.Tensor) -> torch.Tensor:
    """The fingerprinted elements of `tensor`, in float64: the same positions for the same shape."""
    if not tensor.numel():
        return tensor.detach().reshape(-1).to(torch.float64)
    rows = tensor.detach().reshape(tensor.shape[0] if tensor.dim() else 1, -1)  # one row per expert
    if rows.shape[1] > _BLOCK * _BLOCKS:
        rows = rows.index_select(1, _columns(rows.shape[1], rows.device))
    return rows.reshape(-1).to(torch.float64)


@dataclass(frozen=True)
class Fingerprint:
    """Float64 reductions of a fixed sample of one tensor (`_sample`: part of every expert's slice): its sum, a
    position-weighted sum, and its L2 norm.

    The weighted sum catches permuted or swapped expert rows that keep the plain sum. Computed on the tensor's own
    device, exact for the same data on the same device. If the dtype changed since (DeepSpeed casting an fp32
    model to bf16, say), they are compared within that dtype's rounding: round-to-nearest errors are unbiased and
    independent, so their sum is about eps/2 * ||x||; 8 * eps * ||x|| allows for that while data from another
    rank (a difference of order ||x||) still fails.
    """

    shape: tuple[int, ...]
    dtype: str
    total: float
    weighted: float
    norm: float

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "Fingerprint":
        sample = _sample(tensor)
        weights = (torch.arange(sample.numel(), device=sample.device, dtype=torch.float64) % _PERIOD) + 1
        return cls(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), float(sample.sum()),
                   float(torch.dot(sample, weights)), float(torch.linalg.vector_norm(sample)))

    def matches(self, other: "Fingerprint | None") -> bool:
        if other is None or other.shape != self.shape:
            return False
        if other.dtype == self.dtype:
            return other.total == self.total and other.weighted == self.weighted
        eps = max(torch.finfo(getattr(torch, d)).eps for d in (self.dtype, other.dtype))
        bound = 8 * eps * self.norm
        return abs(other.total - self.total) <= bound and abs(other.weighted - self.weighted) <= _PERIOD * bound


def fingerprints(tensors: dict[str, torch.Tensor]) -> dict[str, Fingerprint]:
    return {name: Fingerprint.of(local_tensor(tensor)) for name, tensor in tensors.items()}
