"""`python -m ep_ds_shim doctor`: real subprocesses for the happy path and for broken installs (a package that
fails to import is simulated by a module of that name earlier on the path), simulated releases for refusals."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import ep_ds_shim.doctor as doctor
from ep_ds_shim.__main__ import main as cli


def run_doctor(*args, env=None, cwd=None):
    environment = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ep_ds_shim", "doctor", *args], capture_output=True, text=True,
                          env=environment, cwd=cwd)


def test_doctor_json_on_this_machine():
    out = run_doctor("--json")
    report = json.loads(out.stdout)
    assert out.returncode == (0 if report["ok"] else 1)
    assert report["versions"]["transformers"] and report["versions"]["torch"]
    assert report["imports"] == {name: "ok" for name in report["imports"]}
    assert report["transformers_supported"] is True
    roles = {check["role"] for check in report["checks"]}
    assert roles >= {"entry", "gate", "question"}
    assert {check["point"] for check in report["checks"] if check["role"] == "gate"} == {
        "get_init_context", "_from_config", "check_and_set_device_map", "_load_pretrained_model",
        "_move_missing_keys_from_meta_to_device", "_initialize_missing_keys"}
    assert all(check["ok"] for check in report["checks"])
    assert report["ep_spelling"]
    assert report["zero3_signalled"] is False
    assert report["distributed"]["environment"]["WORLD_SIZE"] == "1"


def _broken(tmp_path, name: str):
    """A directory that, first on PYTHONPATH, makes `import name` fail the way a broken install does."""
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('simulated broken install of " + name + "')\n")
    return str(tmp_path)


def test_broken_dependencies_get_one_line_and_exit_1(tmp_path):
    for name in ("deepspeed", "transformers", "wrapt", "torch"):
        root = tmp_path / name
        root.mkdir()
        out = run_doctor(env={"PYTHONPATH": os.pathsep.join([_broken(root, name), os.environ.get("PYTHONPATH", "")])},
                         cwd=tmp_path)
        assert out.returncode == 1, (name, out.stdout, out.stderr)
        assert "Traceback" not in out.stdout + out.stderr, (name, out.stderr)
        assert f"simulated broken install of {name}" in out.stdout, (name, out.stdout)
        assert "result: OK" not in out.stdout
        lines = [line for line in out.stdout.splitlines() if f"simulated broken install of {name}" in line]
        assert len(lines) == 2, lines  # the imports line and the problem, each once


def test_unverified_release_still_shows_every_check_and_the_spelling(monkeypatch, capsys):
    real_version = doctor._version
    monkeypatch.setattr(doctor, "_version", lambda name: "5.99.0" if name == "transformers" else real_version(name))
    assert cli(["doctor", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["transformers_supported"] is False
    assert report["checks"] and all(check["ok"] for check in report["checks"])  # the shape checks still ran
    assert report["ep_spelling"]
    [problem] = report["problems"]
    assert "5.99.0" in problem["problem"] and "newer than" in problem["problem"]
    assert "ep_ds_shim verify" in problem["what_to_do"] and "EP_DS_SHIM_ALLOW_UNVERIFIED" in problem["what_to_do"]


def test_refused_release_names_the_reason_and_still_checks(monkeypatch, capsys):
    real_version = doctor._version
    monkeypatch.setattr(doctor, "_version", lambda name: "5.4.0" if name == "transformers" else real_version(name))
    assert cli(["doctor"]) == 1
    human = capsys.readouterr().out
    assert "transformers release verified: NO" in human and "broken upstream" in human
    assert "check gate" in human and "strategy: none" in human
    assert human.count("broken upstream") == 1


def _hidden(tmp_path, name: str):
    """A directory that, first on PYTHONPATH, makes `name` look not installed: `import name` raises
    ModuleNotFoundError and `importlib.util.find_spec(name)` is None (what transformers checks before using it)."""
    (tmp_path / "sitecustomize.py").write_text(f"import sys\nsys.modules[{name!r}] = None\n")
    return str(tmp_path)


@pytest.mark.parametrize("how", ["missing", "broken"])
def test_a_missing_accelerate_fails_the_doctor_with_the_install_line(how, tmp_path):
    """transformers' EP load needs accelerate (device_map): without it every rank fails the load, so the doctor must
    not say OK, and its advice installs what the package declares."""
    root = (_hidden if how == "missing" else _broken)(tmp_path, "accelerate")
    out = run_doctor(env={"PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}, cwd=tmp_path)
    assert out.returncode == 1, out.stdout
    assert "result: OK" not in out.stdout and "Traceback" not in out.stdout + out.stderr, out.stdout + out.stderr
    assert re.search(r"imports: .*accelerate: (ModuleNotFoundError|ImportError)", out.stdout), out.stdout
    advice = [line for line in out.stdout.splitlines() if "what to do" in line and "accelerate" in line]
    assert advice and "pip install 'accelerate" in advice[0] and ">=1.10" in advice[0], out.stdout


def test_the_package_requires_everything_the_doctor_checks():
    """`pip install ep-ds-shim` brings every dependency the doctor requires (accelerate included)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    declared = {Requirement(text).name.lower() for text in metadata.requires("ep-ds-shim") or []
                if not Requirement(text).marker}
    assert set(doctor.DEPENDENCIES) <= declared, set(doctor.DEPENDENCIES) - declared
