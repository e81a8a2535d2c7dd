"""Shape checks of a target with several verified parameter spellings: each spelling passes, anything else is drift
(the check is exact per spelling, not loosened)."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest

from ep_ds_shim.loading.gates import init_context
from ep_ds_shim.patching.targets import check_shape

SPELLINGS = {
    "5.3-5.24": "cls, dtype, is_quantized, _is_ds_init_called, allow_all_kernels",
    "5.25": "cls, dtype, is_quantized, _is_ds_init_called, allow_all_kernels, config=None",
}
DRIFTED = {
    "a parameter dropped": "cls, dtype, is_quantized, _is_ds_init_called",
    "another parameter added": "cls, dtype, is_quantized, _is_ds_init_called, allow_all_kernels, config=None, x=None",
    "renamed": "cls, dtype, is_quantized, _is_ds_init_called, allow_all_kernels, model_config=None",
}


def _release_with(monkeypatch, signature: str):
    """A module whose class defines get_init_context with `signature`, asking the ZeRO-3 question as upstream does."""
    module = types.ModuleType("fake_release_modeling")
    exec(  # noqa: S102 - builds the stand-in from a signature string
        "def is_deepspeed_zero3_enabled():\n    return False\n"
        "class PreTrainedModel:\n"
        "    @classmethod\n"
        f"    def get_init_context({signature}):\n"
        "        return [is_deepspeed_zero3_enabled()]\n",
        module.__dict__,
    )
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return dataclasses.replace(init_context.GATE.target, owner=f"{module.__name__}:PreTrainedModel")


@pytest.mark.parametrize("releases", SPELLINGS)
def test_every_verified_spelling_passes(monkeypatch, releases):
    report = check_shape(_release_with(monkeypatch, SPELLINGS[releases]))
    assert report.ok, report.problem
    assert report.looks_up


@pytest.mark.parametrize("change", DRIFTED)
def test_any_other_spelling_is_drift_naming_every_verified_one(monkeypatch, change):
    report = check_shape(_release_with(monkeypatch, DRIFTED[change]))
    assert not report.ok
    assert "get_init_context: parameters" in report.problem
    for params in init_context.GATE.target.verified_params:
        assert str(params) in report.problem


def test_the_installed_release_matches_one_spelling():
    report = check_shape(init_context.GATE.target)
    assert report.ok, report.problem
    assert report.found_params in init_context.GATE.target.verified_params
