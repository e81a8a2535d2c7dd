"""The figures `verify` prints: each difference relative to the scale of the values it compares.

An absolute tolerance says nothing about a model whose gradients are large (qwen3_5_moe_text's reach ~8: float
summation noise of 1.5e-5 there is 2e-6 of the scale) and too little about one whose gradients are tiny. So every
figure is ``max|shim - reference| / scale``, with one scale per compared quantity, and every check holds every
figure to the same relative tolerance (`TOLERANCE`):

- logits: the largest |logit| of this rank's reference batch; loss: |reference loss|; gradient norm: the reference
  norm; gradients: the largest |gradient| of the whole model (a weight whose gradients are all tiny is held to the
  model's scale, not to its own, where float noise would decide);
- weights after the AdamW step (and the exported weights): the largest |weight| plus lr / eps times the largest
  |gradient|. Adam's first update is lr * g / (|g| + eps), whose slope in g is at most lr / eps, so gradients that
  agree within the tolerance can move a weight by up to lr / eps times that; a wrong or missing update moves it by
  about lr, far above (`oracle.param_tolerance` is the same bound in absolute terms).

Expert slices are copies: they must be equal (0), not close.
"""

from __future__ import annotations

import math

import torch

from ..testing import oracle

# Relative tolerance per device: CUDA kernels may sum in another order than the reference's.
TOLERANCE = {"cpu": 1e-5, "cuda": 1e-4}


def describe(tolerance: float, optimizer: dict = oracle.OPTIMIZER) -> str:
    """The tolerance line of the report."""
    return (f"every figure is max|difference| / scale of the compared values, pass when <= {tolerance:g}; scales: "
            "logits, loss, gradient norm, gradients: their largest reference value; weights after the AdamW step: "
            f"largest weight + lr/eps ({optimizer['lr'] / optimizer['eps']:g}) x largest gradient; expert slices: "
            "must be equal")


def _largest(tensors) -> float:
    return max((float(t.detach().abs().max()) for t in tensors if t.numel()), default=0.0)


def relative(difference: float, scale: float) -> float:
    """`difference` / `scale`; a zero scale makes any nonzero difference infinitely large."""
    if scale > 0:
        return difference / scale
    return 0.0 if difference == 0 else math.inf


def scales(reference: dict, optimizer: dict = oracle.OPTIMIZER) -> dict[str, float]:
    """The scales of one reference step (`oracle.reference_step`), shared by every rank."""
    gradients = _largest(reference["grads"].values())
    return {
        "grads": gradients,
        "grad_norm": abs(reference["grad_norm"]),
        "weights": _largest(reference["params"].values()) + optimizer["lr"] / optimizer["eps"] * gradients,
    }


def logits(shim: torch.Tensor, reference: torch.Tensor) -> float:
    return relative(float((shim.detach().float() - reference.float()).abs().max()), _largest([reference]))


def step(engine, layout, reference: dict, *, logits_out, loss, grads) -> dict[str, float]:
    """One DeepSpeed step of this rank against the single-process step (call after `engine.step()`; `grads` read
    between backward and step with `oracle.full_grads`)."""
    scale = scales(reference)
    weights = {name: oracle.full_fp32(param).detach().clone() for name, param in engine.module.named_parameters()}
    reference_loss = reference["loss"][layout.rank]
    figures = {
        "logits": logits(logits_out, reference["logits"][layout.rank]),
        "loss": relative(abs(loss.item() - reference_loss), abs(reference_loss)),
        "grads": relative(max(oracle.max_abs_diffs(grads, reference["grads"], layout.ep_rank).values()), scale["grads"]),
        "weights": relative(max(oracle.max_abs_diffs(weights, reference["params"], layout.ep_rank).values()),
                            scale["weights"]),
    }
    norm = engine.get_global_grad_norm()
    if norm is not None:
        figures["grad_norm"] = relative(abs(float(norm) - reference["grad_norm"]), scale["grad_norm"])
    return figures


def exported(weights: dict, reference: dict) -> float:
    """Whole exported weights against the reference's weights after the step, on the weights' scale."""
    wanted = {name: reference["params"][name].cpu() for name in weights}
    difference = max(oracle.max_abs_diffs(weights, wanted, ep_rank=0).values(), default=0.0)
    return relative(difference, scales(reference)["weights"])
