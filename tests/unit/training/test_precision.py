"""A DeepSpeed precision setting that disagrees with the model's dtype is named, both sides, before
deepspeed.initialize (a bf16 model with no "bf16" section trained in pure bf16 without a word)."""

from __future__ import annotations

import torch

from ep_ds_shim.training import precision


def _model(dtype):
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)).to(dtype)


def test_a_half_precision_model_without_a_precision_section_is_named():
    problem = precision.disagreement(_model(torch.bfloat16), {"zero_optimization": {"stage": 3}})
    assert "torch.bfloat16" in problem and 'neither "bf16" nor "fp16"' in problem
    assert '"bf16": {"enabled": true}' in problem and "dtype=torch.float32" in problem
    fp16 = precision.disagreement(_model(torch.float16), {"zero_optimization": {"stage": 3}})
    assert '"fp16": {"enabled": true}' in fp16


def test_agreeing_settings_say_nothing():
    assert precision.disagreement(_model(torch.bfloat16), {"bf16": {"enabled": True}}) is None
    assert precision.disagreement(_model(torch.float32), {"bf16": {"enabled": True}}) is None  # mixed precision
    assert precision.disagreement(_model(torch.float32), {}) is None
    assert precision.disagreement(_model(torch.bfloat16), {"bf16": {"enabled": "auto"}}) is None  # filled in later
    assert precision.disagreement(_model(torch.bfloat16), "ds_config.json") is None  # not read here


def test_a_cast_between_half_precisions_is_named():
    problem = precision.disagreement(_model(torch.bfloat16), {"fp16": {"enabled": True}})
    assert "torch.bfloat16" in problem and "torch.float16" in problem
