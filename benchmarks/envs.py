"""The benchmark's own environments, made the way `run.sh`'s `make_env` makes one: torch (the CPU wheel, never a
bare `torch`), requirements/ci.txt, the DeepSpeed wheel cached under build/wheels (built once with DS_BUILD_OPS=0 if
absent), then one transformers release and an ep-ds-shim tree (no dependencies). Each is made once and reused while
its stamp matches.

- build/venvs/bench-autoep: the AutoEP comparison. DeepSpeed AutoEP (0.19.8) fails inside `deepspeed.initialize`
  on transformers 5.23+ (`_CanRecordRegistry.get() takes 2 positional arguments but 3 were given`), so both sides
  run on a release where both work, with this checkout installed (editable).
- build/venvs/bench-baseline-0.2.0: the design before issue 18 (ep-ds-shim 0.2.0, commit 04aa7ff: DeepSpeed gets
  the layout's `mpu`, every rank of an EP group trains on the same batch), the same transformers release, with that
  commit's tree (`git archive` into build/baseline-0.2.0) installed, so both designs run in the same benchmark run.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AUTOEP_TRANSFORMERS = "5.22.2"  # newest release where DeepSpeed 0.19.8 AutoEP works (qwen3_moe and mixtral)
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")
DEEPSPEED_SPEC = os.environ.get("DEEPSPEED_SPEC", "deepspeed==0.19.8")
BASELINE_VERSION, BASELINE_COMMIT = "0.2.0", "04aa7ff"  # the release before ZeRO-3 sharded dense weights over EP


def autoep_env_dir() -> Path:
    return REPO / "build" / "venvs" / "bench-autoep"


def baseline_env_dir() -> Path:
    return REPO / "build" / "venvs" / f"bench-baseline-{BASELINE_VERSION}"


def baseline_tree() -> Path:
    return REPO / "build" / f"baseline-{BASELINE_VERSION}"


def _stamp_text(*extra: str) -> str:
    return "\n".join([(REPO / "requirements" / "ci.txt").read_text(), TORCH_SPEC, DEEPSPEED_SPEC,
                      f"transformers=={AUTOEP_TRANSFORMERS}", *extra])


def _make_env(venv: Path, stamp_text: str, tree: Path, *, editable: bool, extensions: Path, log) -> Path:
    """A python in `venv` with torch, the CI requirements, DeepSpeed, transformers AUTOEP_TRANSFORMERS and the
    ep-ds-shim tree `tree` (created on first use, a few minutes; reused while its stamp matches)."""
    python = venv / "bin" / "python"
    stamp = venv / ".bench-ready"
    if python.exists() and stamp.exists() and stamp.read_text() == stamp_text:
        return python
    log(f"== creating {venv.relative_to(REPO)} (transformers {AUTOEP_TRANSFORMERS}, {DEEPSPEED_SPEC}, {TORCH_SPEC}, "
        f"ep-ds-shim from {tree.relative_to(REPO) if tree != REPO else 'this checkout'}); once, a few minutes")
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
    wheels = sorted(cache.glob("deepspeed-*.whl")) or sorted((REPO / "build" / "wheels" / DEEPSPEED_SPEC).glob(
        "deepspeed-*.whl"))  # run.sh's cache: a DS_BUILD_OPS=0 wheel is pure Python, valid for any torch
    if not wheels:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(python), "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(cache),
                        DEEPSPEED_SPEC], check=True, env=dict(env, DS_BUILD_OPS="0"))
        wheels = sorted(cache.glob("deepspeed-*.whl"))
    run("--no-deps", str(wheels[-1]))
    run(f"transformers=={AUTOEP_TRANSFORMERS}")
    run("--no-deps", "--no-build-isolation", *(["-e"] if editable else []), str(tree))
    # DeepSpeed JIT-builds its CPU communication op on first use; torch rebuilds it whenever another interpreter
    # loaded it last, so each environment keeps its own copy (built here, once).
    subprocess.run([str(python), "-c", "from deepspeed.accelerator import get_accelerator; "
                    "get_accelerator().create_op_builder('ShareMemCommBuilder').load()"],
                   check=True, env=dict(env, TORCH_EXTENSIONS_DIR=str(extensions), DS_ACCELERATOR="cpu"),
                   cwd=str(venv))
    stamp.write_text(stamp_text)
    return python


def ensure_autoep_env(log=print) -> Path:
    """The AutoEP comparison's python, with this checkout installed (editable)."""
    return _make_env(autoep_env_dir(), _stamp_text(), REPO, editable=True,
                     extensions=Path(autoep_env_vars()["TORCH_EXTENSIONS_DIR"]), log=log)


def ensure_baseline_env(log=print) -> Path:
    """The python of ep-ds-shim 0.2.0 (commit BASELINE_COMMIT, exported from this repository's history once)."""
    tree = baseline_tree()
    marker = tree / ".bench-commit"
    if not (marker.exists() and marker.read_text() == BASELINE_COMMIT):
        log(f"== exporting ep-ds-shim {BASELINE_VERSION} (commit {BASELINE_COMMIT}) to {tree.relative_to(REPO)}")
        subprocess.run(["rm", "-rf", str(tree)], check=True)
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", BASELINE_COMMIT], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        marker.write_text(BASELINE_COMMIT)
    # not editable: the workers must import 0.2.0 from site-packages, never this checkout
    return _make_env(baseline_env_dir(), _stamp_text(f"ep-ds-shim {BASELINE_COMMIT}"), tree, editable=False,
                     extensions=Path(baseline_env_vars()["TORCH_EXTENSIONS_DIR"]), log=log)


def autoep_env_vars() -> dict:
    """Environment variables of every process run with the AutoEP comparison's python."""
    return {"TORCH_EXTENSIONS_DIR": str(REPO / "build" / "torch_extensions-bench-autoep"), "DS_ACCELERATOR": "cpu"}


def baseline_env_vars() -> dict:
    """Environment variables of every process run with the 0.2.0 baseline's python. PYTHONPATH is empty: the
    orchestrator's points at this checkout, which would shadow the installed 0.2.0 package."""
    return {"TORCH_EXTENSIONS_DIR": str(REPO / "build" / f"torch_extensions-bench-baseline-{BASELINE_VERSION}"),
            "DS_ACCELERATOR": "cpu", "PYTHONPATH": ""}
