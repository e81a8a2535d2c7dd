"""The environment of the AutoEP comparison: DeepSpeed AutoEP (0.19.8) fails inside `deepspeed.initialize` on
transformers 5.23+ (`_CanRecordRegistry.get() takes 2 positional arguments but 3 were given`), so the comparison
runs both sides on a release where both work, in an environment of its own, made the way `run.sh`'s `make_env`
makes one: torch (the CPU wheel, never a bare `torch`), requirements/ci.txt, the DeepSpeed wheel cached under
build/wheels (built once with DS_BUILD_OPS=0 if absent), then that transformers release and this checkout
(editable, no dependencies). Reused while its stamp matches.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AUTOEP_TRANSFORMERS = "5.22.2"  # newest release where DeepSpeed 0.19.8 AutoEP works (qwen3_moe and mixtral)
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")
DEEPSPEED_SPEC = os.environ.get("DEEPSPEED_SPEC", "deepspeed==0.19.8")


def autoep_env_dir() -> Path:
    return REPO / "build" / "venvs" / "bench-autoep"


def _stamp_text() -> str:
    return "\n".join([(REPO / "requirements" / "ci.txt").read_text(), TORCH_SPEC, DEEPSPEED_SPEC,
                      f"transformers=={AUTOEP_TRANSFORMERS}"])


def ensure_autoep_env(log=print) -> Path:
    """The AutoEP comparison's python (created on first use, a few minutes; reused afterwards)."""
    venv = autoep_env_dir()
    python = venv / "bin" / "python"
    stamp = venv / ".bench-ready"
    if python.exists() and stamp.exists() and stamp.read_text() == _stamp_text():
        return python
    log(f"== creating {venv.relative_to(REPO)} (transformers {AUTOEP_TRANSFORMERS}, {DEEPSPEED_SPEC}, {TORCH_SPEC}); "
        "once, a few minutes")
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    if not python.exists():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)  # as run.sh does
    pip = [str(python), "-m", "pip", "install", "-q"]
    run = lambda *args: subprocess.run([*pip, *args], check=True, env=env)  # noqa: E731
    run("--upgrade", "pip")
    run(TORCH_SPEC)  # alone and first: a bare torch requirement elsewhere could pull a CUDA build
    run("-r", str(REPO / "requirements" / "ci.txt"))
    torch_version = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"], check=True,
                                   capture_output=True, text=True).stdout.strip()
    cache = REPO / "build" / "wheels" / f"{DEEPSPEED_SPEC}-torch{torch_version}"
    wheels = sorted(cache.glob("deepspeed-*.whl"))
    if not wheels:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(python), "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(cache),
                        DEEPSPEED_SPEC], check=True, env=dict(env, DS_BUILD_OPS="0"))
        wheels = sorted(cache.glob("deepspeed-*.whl"))
    run("--no-deps", str(wheels[-1]))
    run(f"transformers=={AUTOEP_TRANSFORMERS}")
    run("--no-deps", "--no-build-isolation", "-e", str(REPO))
    # DeepSpeed JIT-builds its CPU communication op on first use; torch rebuilds it whenever another interpreter
    # loaded it last, so this environment keeps its own copy (built here, once).
    subprocess.run([str(python), "-c", "from deepspeed.accelerator import get_accelerator; "
                    "get_accelerator().create_op_builder('ShareMemCommBuilder').load()"],
                   check=True, env=dict(env, **autoep_env_vars()))
    stamp.write_text(_stamp_text())
    return python


def autoep_env_vars() -> dict:
    """Environment variables of every process run with the AutoEP comparison's python."""
    return {"TORCH_EXTENSIONS_DIR": str(REPO / "build" / "torch_extensions-bench-autoep"), "DS_ACCELERATOR": "cpu"}

