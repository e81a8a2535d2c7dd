"""Launching real multi-process jobs and collecting what each rank reports: shared by the tests, the support matrix,
the benchmarks, the examples and `python -m ep_ds_shim verify`.

A job's command line may contain ``{json}`` (replaced by a per-rank report path template, ``...-{rank}.json``) and
``{port}`` (a free TCP port). Each rank writes its report with `write_report`; `run_job` returns the exit status,
the combined output and every report it finds.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, *rest, port: str = "{port}") -> list[str]:
    """A single-node `torchrun` command line over loopback."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={port}", *map(str, rest)]


def job_env(extra: dict | None = None) -> dict:
    """The environment of a CPU job: DeepSpeed's CPU accelerator, one thread per rank (ranks share the cores),
    no hub access."""
    return {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(extra or {})}


@dataclass
class JobResult:
    returncode: int
    output: str
    reports: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def __repr__(self) -> str:
        return f"JobResult(rc={self.returncode}, reports={len(self.reports)})\n{self.output[-6000:]}"


def run_job(argv, *, nproc: int, env: dict | None = None, cwd=None, timeout: float = 900,
            report_dir=None) -> JobResult:
    """Run one launcher command line (`{json}` / `{port}` filled in) and collect the reports of ranks 0..nproc-1."""
    report_dir = Path(report_dir or tempfile.gettempdir())
    report = report_dir / f"ep-ds-shim-report-{uuid.uuid4().hex[:12]}-{{rank}}.json"
    port = str(free_port())
    argv = [str(a).replace("{json}", str(report)).replace("{port}", port) for a in argv]
    try:
        proc = subprocess.run(argv, cwd=cwd, env=job_env(env), capture_output=True, text=True, timeout=timeout)
        returncode, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as expired:
        returncode = -9
        output = f"{_text(expired.stdout)}{_text(expired.stderr)}\n[timed out after {timeout} s]"
    return JobResult(returncode, output, collect_reports(str(report), nproc))


def run_nodes(node_argvs: list[list], *, nproc: int, env: dict | None = None, cwd=None, timeout: float = 900,
              report_dir=None) -> JobResult:
    """Run one launcher command line per node at the same time (the same `{json}` and `{port}` in all of them),
    as a multi-node job on this machine; collect the reports of global ranks 0..nproc-1."""
    report_dir = Path(report_dir or tempfile.gettempdir())
    report = report_dir / f"ep-ds-shim-report-{uuid.uuid4().hex[:12]}-{{rank}}.json"
    port = str(free_port())
    procs = [subprocess.Popen([str(a).replace("{json}", str(report)).replace("{port}", port) for a in argv], cwd=cwd,
                              env=job_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for argv in node_argvs]
    outputs, returncode = [], 0
    for node, proc in enumerate(procs):
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            out += f"\n[timed out after {timeout} s]"
        returncode = returncode or proc.returncode
        outputs.append(f"--- node {node} (exit {proc.returncode})\n{out}")
    return JobResult(returncode, "\n".join(outputs), collect_reports(str(report), nproc))


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def collect_reports(template: str, nproc: int) -> list[dict]:
    """Read and remove every rank's report (ranks that wrote none are skipped)."""
    reports = []
    for rank in range(nproc):
        path = Path(template.format(rank=rank))
        if path.exists():
            reports.append(json.loads(path.read_text()))
            path.unlink()
    return reports


def write_report(template: str, report: dict, *, rank: int | None = None) -> None:
    """Worker side: write this rank's report (`template` holds ``{rank}``; default rank: $RANK)."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    Path(template.format(rank=rank)).write_text(json.dumps(report, indent=1, default=str))
