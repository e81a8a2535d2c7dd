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


@dataclass(frozen=True)
class Fingerprint:
    """Float64 reductions of one tensor: its sum and a position-weighted sum (plus their magnitudes).

    The weighted sum catches permuted or swapped expert rows that keep the plain sum. Both are one pass on
    the tensor's own device and exact for the same data; if the dtype changed since (DeepSpeed casting an
    fp32 model to bf16, say) they are compared within that dtype's rounding instead.
    """

    shape: tuple[int, ...]
    dtype: str
    total: float
    weighted: float
    magnitude: float
    weighted_magnitude: float

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "Fingerprint":
        flat = tensor.detach().reshape(-1).to(torch.float64)
        weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64).remainder_(1009.0)
        weighted = flat * weights
        return cls(
            tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."),
            float(flat.sum()), float(weighted.sum()), float(flat.abs().sum()), float(weighted.abs().sum()),
        )

    def matches(self, other: "Fingerprint | None") -> bool:
        if other is None or other.shape != self.shape:
            return False
        if other.dtype == self.dtype:
            return other.total == self.total and other.weighted == self.weighted
        eps = max(torch.finfo(getattr(torch, d)).eps for d in (self.dtype, other.dtype))
        return abs(other.total - self.total) <= 2 * eps * self.magnitude and abs(
            other.weighted - self.weighted
        ) <= 2 * eps * self.weighted_magnitude


def fingerprints(tensors: dict[str, torch.Tensor]) -> dict[str, Fingerprint]:
    return {name: Fingerprint.of(local_tensor(tensor)) for name, tensor in tensors.items()}
