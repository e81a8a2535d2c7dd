"""verify's figures are relative to the scale of what they compare: float noise on large values passes, a relative
error of 1e-3 fails wherever it sits, and the report states the tolerance and prints one summary line."""

from __future__ import annotations

import io
from collections import Counter

import torch

from ep_ds_shim.testing import oracle
from ep_ds_shim.verify import figures, report


def _reference(scale: float) -> dict:
    generator = torch.Generator().manual_seed(0)
    grads = {"a": torch.randn(8, 8, generator=generator) * scale, "b": torch.randn(4, generator=generator) * 1e-3}
    params = {"a": torch.randn(8, 8, generator=generator) * 0.2, "b": torch.randn(4, generator=generator) * 0.2}
    norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])))
    return {"grads": grads, "params": params, "grad_norm": norm}


def _grads_figure(reference: dict, shim: dict) -> float:
    scale = figures.scales(reference)["grads"]
    return figures.relative(max(oracle.max_abs_diffs(shim, reference["grads"], 0).values()), scale)


def test_float_noise_on_large_gradients_passes():
    """qwen3_5_moe_text on 5.24: gradients up to ~8, a difference of 1.5e-5 from summation order (an fp32 single
    process differs from fp64 by 2e-5): far below 1e-5 of the scale, where an absolute 1e-5 failed it."""
    reference = _reference(scale=8.0)
    noisy = {name: grad + 1.5e-5 * torch.sign(grad) for name, grad in reference["grads"].items()}
    assert _grads_figure(reference, noisy) <= figures.TOLERANCE["cpu"]


def test_a_relative_error_of_1e_3_fails_at_any_scale():
    for scale in (1e-4, 1.0, 1e3):
        reference = _reference(scale)
        perturbed = {name: grad * (1 + 1e-3) for name, grad in reference["grads"].items()}
        assert _grads_figure(reference, perturbed) > 50 * figures.TOLERANCE["cpu"], scale


def test_weights_are_held_beyond_adams_amplification_of_the_measured_gradient_difference():
    reference = _reference(scale=8.0)
    gradient_difference = 1.5e-5  # float noise on large gradients: Adam may turn it into 1.5e-4 on a weight
    allowance = figures.adam_allowance(gradient_difference)
    assert allowance == oracle.OPTIMIZER["lr"] / oracle.OPTIMIZER["eps"] * gradient_difference
    assert figures.weights(allowance, reference, allowance) == 0.0
    # a missing or wrong update (a weight off by about lr) fails, whatever the gradients' scale
    assert figures.weights(oracle.OPTIMIZER["lr"], reference, allowance) > 100 * figures.TOLERANCE["cpu"]


def test_zero_scale():
    assert figures.relative(0.0, 0.0) == 0.0 and figures.relative(1e-12, 0.0) == float("inf")


class _Layout:
    world_size, dp_size, ep_size = 2, 1, 2


def test_report_states_the_tolerance_and_ends_with_the_summary():
    outcomes = {"qwen3_moe": {check: {"outcome": "pass", "detail": "logits=1.0e-07"} for check in ("step", "load",
                                                                                                 "export")}}
    out = io.StringIO()
    report.print_report(outcomes, _Layout(), 1e-5, Counter({"FutureWarning": 12}), out=out)
    text = out.getvalue()
    lines = text.splitlines()
    assert lines[1].startswith("tolerance: relative, <= 1e-05") and "largest reference value" in lines[1]
    assert [line.split()[1] for line in lines[3:6]] == ["load", "step", "export"]  # in the order they run
    assert "held back: 12 warnings" in text and "--verbose" in text
    assert lines[-1] == "1 model type(s), 3 checks: 3 pass, 0 known, 0 FAIL"
