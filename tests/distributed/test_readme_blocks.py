"""The README's runnable blocks, run as a user would: its quickstart block (not the example file: the block itself)
under torchrun on 2 CPU ranks in an empty directory, and the doctor. The quickstart trains and saves; the export is
reloaded in a plain single process and must have learned (a lower loss on the toy data than the model it started
from), not merely have been written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ep_ds_shim.testing import run_job, torchrun

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def _block(title: str, language: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return re.findall(rf"^```{language}\n(.*?)^```", README[start:end], flags=re.S | re.M)


@pytest.mark.distributed
def test_readme_quickstart_trains_on_two_cpu_ranks(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    [script] = _block("Quickstart", "python")
    [command] = [line for block in _block("Quickstart", "bash") for line in block.splitlines()
                 if line.startswith("torchrun --nproc_per_node 2")]
    assert command.split("#")[0].split()[-1] == "examples/quickstart.py"
    (tmp_path / "quickstart.py").write_text(script)
    run = run_job(torchrun(2, "quickstart.py"), nproc=2, cwd=tmp_path, timeout=1800)
    assert run.returncode == 0, run
    losses = [float(x) for x in re.findall(r"^step +\d+ +loss ([0-9.]+)$", run.output, flags=re.M)]
    assert len(losses) == 4, run.output[-3000:]  # rank 0 only, every 4th of 16 steps
    assert "saved build/quickstart/checkpoint and build/quickstart/model" in run.output
    assert "Traceback" not in run.output and "is deprecated" not in run.output, run.output[-3000:]
    assert (tmp_path / "build/quickstart/checkpoint/latest").exists()

    data = (torch.arange(16).repeat(64, 1) + torch.arange(64)[:, None]) % 128  # the script's toy data
    start = AutoModelForCausalLM.from_pretrained(tmp_path / "build/quickstart/tiny-qwen3-moe", dtype=torch.float32)
    trained, info = AutoModelForCausalLM.from_pretrained(tmp_path / "build/quickstart/model", dtype=torch.float32,
                                                         output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        before = start(input_ids=data, labels=data).loss.item()
        after = trained(input_ids=data, labels=data).loss.item()
    assert after < before - 0.2, (before, after)


def test_readme_doctor_line_passes_here():
    [checks] = [block for block in _block("Install", "bash") if "ep_ds_shim doctor" in block]
    command = next(line for line in checks.splitlines() if "ep_ds_shim doctor" in line).split("#")[0].split()
    assert command[:4] == ["python", "-m", "ep_ds_shim", "doctor"]
    out = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "result: OK" in out.stdout, out.stdout + out.stderr
