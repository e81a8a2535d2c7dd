"""The figures `verify` prints: each difference relative to the scale of the values it compares.

An absolute tolerance says nothing about a model whose gradients are large (qwen3_5_moe_text's reach ~8: float
summation noise of 1.5e-5 there is 2e-6 of the scale) and too little about one whose gradients are tiny. So every
figure is ``max|shim - reference| / scale``, with one scale per compared quantity, and every check holds every
figure to the same relative tolerance (`TOLERANCE`):

- logits: the largest |logit| of this rank's reference batch; loss: |reference loss|; gradient norm: the reference
  norm; gradients: the largest |gradient| of the whole model (a weight whose gradients are all tiny is held to the
  model's scale, not to its own, where float noise would decide);
- weights after the AdamW step (and the exported weights): the difference beyond what the measured gradient
  difference explains, relative to the largest |weight|. Adam's first update is lr * g / (|g| + eps), whose slope
  in g is at most lr / eps, so gradients that differ by d can move a weight by up to lr / eps * d (10 x d here); a
  wrong or missing update moves it by about lr, far above (`oracle.param_tolerance` is the same bound, absolute).

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
    return (f"relative, <= {tolerance:g}: each figure is max|difference| / the largest reference value of what it "
            f"compares; weights after the AdamW step: beyond lr/eps ({optimizer['lr'] / optimizer['eps']:g}) x the "
            "gradient difference; expert slices: equal")


def _largest(tensors) -> float:
    return max((float(t.detach().abs().max()) for t in tensors if t.numel()), default=0.0)


def relative(difference: float, scale: float) -> float:
    """`difference` / `scale`; a zero scale makes any nonzero difference infinitely large."""
    if scale > 0:
        return difference / scale
    return 0.0 if difference == 0 else math.inf


def scales(reference: dict) -> dict[str, float]:
    """The scales of one reference step (`oracle.reference_step`), shared by every rank."""
    return {
        "grads": _largest(reference["grads"].values()),
        "grad_norm": abs(reference["grad_norm"]),
        "weights": _largest(reference["params"].values()),
    }


def adam_allowance(gradient_difference: float, optimizer: dict = oracle.OPTIMIZER) -> float:
    """How far one AdamW step can move a weight when its gradient differs by `gradient_difference`."""
    return optimizer["lr"] / optimizer["eps"] * gradient_difference


def weights(difference: float, reference: dict, allowance: float) -> float:
    """A weight difference after the step, beyond `allowance` (`adam_allowance`), on the weights' scale."""
    return relative(max(0.0, difference - allowance), scales(reference)["weights"])


def logits(shim: torch.Tensor, reference: torch.Tensor) -> float:
    return relative(float((shim.detach().float() - reference.float()).abs().max()), _largest([reference]))


def step(engine, layout, reference: dict, *, logits_out, loss, grads) -> dict[str, float]:
    """One DeepSpeed step of this rank against the single-process step (call after `engine.step()`; `grads` read
    between backward and step with `oracle.full_grads`)."""
    scale = scales(reference)
    held = {name: oracle.full_fp32(param).detach().clone() for name, param in engine.module.named_parameters()}
    reference_loss = reference["loss"][layout.rank]
    gradient_difference = max(oracle.max_abs_diffs(grads, reference["grads"], layout.ep_rank).values())
    allowance = adam_allowance(gradient_difference)
    figures = {
        "logits": logits(logits_out, reference["logits"][layout.rank]),
        "loss": relative(abs(loss.item() - reference_loss), abs(reference_loss)),
        "grads": relative(gradient_difference, scale["grads"]),
        "weights": weights(max(oracle.max_abs_diffs(held, reference["params"], layout.ep_rank).values()), reference,
                           allowance),
        "_allowance": allowance,  # for the export check; not a figure
    }
    norm = engine.get_global_grad_norm()
    if norm is not None:
        figures["grad_norm"] = relative(abs(float(norm) - reference["grad_norm"]), scale["grad_norm"])
    return figures


def exported(saved: dict, reference: dict, allowance: float) -> float:
    """Whole exported weights against the reference's weights after the step, as the step's weights are held."""
    wanted = {name: reference["params"][name].cpu() for name in saved}
    return weights(max(oracle.max_abs_diffs(saved, wanted, ep_rank=0).values(), default=0.0), reference, allowance)
