"""Shared fixtures: tiny MoE checkpoints built with the installed transformers release, and a runner that
executes a script over N real gloo ranks with torchrun and collects each rank's JSON report."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build"

# DeepSpeed on CPU: its accelerator, and one cache for the C++ op it JIT-builds (built once per machine).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(BUILD / "torch_extensions"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


@pytest.fixture(scope="session")
def tiny_checkpoint():
    """Factory: path of a tiny checkpoint of `family`, built once per transformers release."""
    from ep_ds_shim.testing import build_tiny_moe

    def build(family: str, **sizes) -> Path:
        suffix = "-".join(f"{k}{v}" for k, v in sorted(sizes.items()))
        path = BUILD / "ckpt" / transformers_version() / (family + (f"-{suffix}" if suffix else ""))
        return build_tiny_moe(path, family, **sizes)

    return build


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RankRun:
    def __init__(self, returncode: int, output: str, reports: list[dict]):
        self.returncode, self.output, self.reports = returncode, output, reports

    def __repr__(self):
        return f"RankRun(rc={self.returncode}, reports={len(self.reports)})\n{self.output[-4000:]}"


@pytest.fixture
def run_command(tmp_path):
    """Run a launcher command line; `{json}` in it becomes a per-rank report path, `{port}` a free port.
    Returns the exit status, the output and every rank's JSON report."""

    def run(argv, *, nproc: int, timeout: int = 900, env: dict | None = None) -> RankRun:
        report = tmp_path / f"report-{_free_port()}-{{rank}}.json"
        port = str(_free_port())
        argv = [str(a).replace("{json}", str(report)).replace("{port}", port) for a in argv]
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        proc = subprocess.run(argv, cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout)
        reports = []
        for rank in range(nproc):
            path = Path(str(report).format(rank=rank))
            if path.exists():
                reports.append(json.loads(path.read_text()))
        return RankRun(proc.returncode, proc.stdout + proc.stderr, reports)

    return run


def torchrun(nproc: int, *rest) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            "--master_port={port}", *rest]


@pytest.fixture
def run_ranks(run_command):
    """Run `script args...` on `nproc` gloo ranks with torchrun; each rank writes JSON to {json}."""

    def run(script: Path | str, *args: str, nproc: int = 2, timeout: int = 900) -> RankRun:
        return run_command(torchrun(nproc, str(script), *args), nproc=nproc, timeout=timeout)

    return run
