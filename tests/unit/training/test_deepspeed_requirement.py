"""A DeepSpeed without per-parameter ZeRO-3 placement is refused before `deepspeed.initialize`, even with the opt-in:
its ZeRO-3 would partition every expert shard over all ranks (the support matrix's DeepSpeed 0.19.0 row failed so)."""

from __future__ import annotations

import deepspeed
import pytest
from deepspeed.runtime.engine import DeepSpeedEngine

from ep_ds_shim.errors import UnsupportedReleaseError
from ep_ds_shim.releases.support import VERIFIED_DEEPSPEED
from ep_ds_shim.training import expert_groups


def test_the_installed_deepspeed_has_the_placement_the_experts_need():
    expert_groups.require_expert_placement(deepspeed)


def test_a_deepspeed_without_it_is_refused_with_the_install_line(monkeypatch):
    monkeypatch.delattr(DeepSpeedEngine, "_resolve_zero3_param_placement")
    monkeypatch.setattr(deepspeed, "__version__", "0.19.0")
    with pytest.raises(UnsupportedReleaseError) as caught:
        expert_groups.require_expert_placement(deepspeed)
    message = str(caught.value)
    assert "DeepSpeed 0.19.0" in message and "0.19.3" in message
    assert f"pip install 'deepspeed{VERIFIED_DEEPSPEED}'" in message
    assert "0.19.0" not in str(VERIFIED_DEEPSPEED)  # the advice installs a release that has it
