"""`python -m ep_ds_shim doctor`: real subprocess for the happy path, a simulated old release for refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ep_ds_shim.__main__ as doctor

REPO = Path(__file__).resolve().parents[2]


def test_doctor_json_on_this_machine():
    env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": "0", "WORLD_SIZE": "1"}
    out = subprocess.run([sys.executable, "-m", "ep_ds_shim", "doctor", "--json"], capture_output=True, text=True,
                         env=env, cwd=REPO)
    report = json.loads(out.stdout)
    assert out.returncode == (0 if report["ok"] else 1)
    assert report["versions"]["transformers"] and report["versions"]["torch"]
    assert report["transformers_supported"] is True
    assert {g["gate"] for g in report["gates"]} >= {
        "get_init_context", "check_and_set_device_map", "_load_pretrained_model",
        "_move_missing_keys_from_meta_to_device", "_initialize_missing_keys"}
    assert all(g["ok"] for g in report["gates"])
    assert report["ep_spelling"]
    assert report["zero3_signalled"] is False
    assert report["distributed"]["environment"]["WORLD_SIZE"] == "1"


def test_doctor_human_output_and_refusal(monkeypatch, capsys):
    import transformers

    assert doctor.main(["doctor"]) in (0, 1)
    human = capsys.readouterr().out
    assert "transformers release supported: yes" in human and "check get_init_context" in human
    monkeypatch.setattr(transformers, "__version__", "5.4.0")
    real_version = doctor._version
    monkeypatch.setattr(doctor, "_version", lambda name: "5.4.0" if name == "transformers" else real_version(name))
    assert doctor.main(["doctor", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["transformers_supported"] is False
    assert any("broken upstream" in p for p in report["problems"])
