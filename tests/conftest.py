"""Shared fixtures: tiny MoE checkpoints built with the installed transformers release, ZeRO-3 signalled the way
launchers signal it, and real multi-process jobs (torchrun over gloo) whose per-rank JSON reports are collected
(`ep_ds_shim.testing.jobs`)."""

from __future__ import annotations

import os
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build"

# DeepSpeed on CPU: its accelerator, and one cache for the C++ op it JIT-builds (built once per machine).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(BUILD / "torch_extensions"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _switches() -> dict[str, str]:
    """The switches the installed transformers needs to run here despite an unmet requirement of its own (5.25
    without kernels>=0.19.1: USE_HUB_KERNELS=0), applied unless the caller set them; shown in pytest's header."""
    from ep_ds_shim.releases.requirements import switches_needed

    applied = {name: value for name, value in switches_needed().items() if name not in os.environ}
    os.environ.update(applied)
    return applied


SWITCHES = _switches()


def pytest_report_header(config):
    from ep_ds_shim.releases.requirements import unmet_requirements

    return [f"{u.describe()}; tests run with {u.switch.variable}={os.environ.get(u.switch.variable)}"
            if u.switch else f"{u.describe()}; no switch: tests that load a model will fail"
            for u in unmet_requirements()]


def checkpoint_path(model_type: str, **sizes) -> Path:
    """Where the tiny checkpoint of `model_type` with `sizes` lives for the installed transformers release."""
    suffix = "-".join(f"{k}{v}" for k, v in sorted(sizes.items()))
    return BUILD / "ckpt" / version("transformers") / (model_type + (f"-{suffix}" if suffix else ""))


@pytest.fixture(scope="session")
def tiny_checkpoint():
    """Factory: path of a tiny checkpoint of `model_type`, built once per transformers release."""
    from ep_ds_shim.testing import build_tiny_moe

    def build(model_type: str, **sizes) -> Path:
        return build_tiny_moe(checkpoint_path(model_type, **sizes), model_type, **sizes)

    return build


@pytest.fixture
def run_command(tmp_path):
    """Run a launcher command line (`{json}`: per-rank report path, `{port}`: a free port) from the repository;
    returns the exit status, the output and every rank's JSON report."""
    from ep_ds_shim.testing import run_job

    def run(argv, *, nproc: int, timeout: int = 900, env: dict | None = None):
        return run_job(argv, nproc=nproc, env=env, cwd=REPO, timeout=timeout, report_dir=tmp_path)

    return run


@pytest.fixture
def run_ranks(run_command):
    """Run `script args...` on `nproc` gloo ranks with torchrun; each rank writes JSON to {json}."""
    from ep_ds_shim.testing import torchrun

    def run(script, *args, nproc: int = 2, timeout: int = 900, env: dict | None = None):
        return run_command(torchrun(nproc, script, *args), nproc=nproc, timeout=timeout, env=env)

    return run


@pytest.fixture
def zero3_signalled():
    """ZeRO-3 signalled the way accelerate / Trainer do it: a live HfDeepSpeedConfig (unset afterwards)."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    config = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    yield config
    unset_hf_deepspeed_config()
