"""Finding a model's expert weights, and fingerprinting them so a clobbered shard is caught.

Every transformers 5.x MoE family keeps its routed experts as fused 3-D (or 2-D bias) tensors in a module
named ``experts`` (``mlp.experts.gate_up_proj`` and friends), indexed by expert on dim 0. Shared experts
live in differently named modules (``shared_expert``, ``shared_experts``) and are dense, so they are not
matched.
"""

from __future__ import annotations

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


# Fingerprints read every 61st element (a prime, so the sample does not line up with rows of any common width)
# and weight each sampled position by (index mod 1009). Measured on a 300 MB checkpoint, reading every element in
# float64 cost a quarter of the load time; the sample costs ~1/60 of that and still sees thousands of values of
# every expert, which is what a clobbered or swapped shard changes. It is not meant to catch a single flipped bit.
_STRIDE = 61
_PERIOD = 1009


@dataclass(frozen=True)
class Fingerprint:
    """Float64 reductions of a fixed sample of one tensor: its sum, a position-weighted sum, and its L2 norm.

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
        sample = tensor.detach().reshape(-1)[::_STRIDE].to(torch.float64)
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
