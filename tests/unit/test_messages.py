"""Advice in messages works: no message sends a user to a file the installed package lacks, every command a
message names exists, and a newer release whose patched code changed is refused with what changed and what to pin,
never with an opt-in that the shape checks would refuse anyway."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import ep_ds_shim
from ep_ds_shim.errors import TargetDriftError, UnsupportedReleaseError

PACKAGE = Path(ep_ds_shim.__file__).parent


def _message_strings():
    """Every string literal of the package that is not a docstring (messages, f-string parts), with its place."""
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                    docstrings.add(id(first.value))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                yield f"{path.relative_to(PACKAGE)}:{node.lineno}", node.value


def test_no_message_points_into_the_repository_docs():
    """docs/ is not in the wheel: a message must name a `python -m ep_ds_shim ...` command or a shipped file."""
    offenders = [(where, text[:80]) for where, text in _message_strings() if "docs/" in text]
    assert not offenders, offenders


def test_every_command_a_message_names_exists():
    from ep_ds_shim.__main__ import main

    named = {match for _, text in _message_strings() for match in re.findall(r"-m ep_ds_shim (\w+)", text)}
    assert named, "no message names a command (the test would prove nothing)"
    for command in named:
        with pytest.raises(SystemExit) as raised:
            main([command, "--help"])
        assert raised.value.code == 0, command


def _newer_release(monkeypatch):
    import transformers

    monkeypatch.delenv("EP_DS_SHIM_ALLOW_UNVERIFIED", raising=False)
    monkeypatch.setattr(transformers, "__version__", "5.99.0")


def test_a_newer_release_that_drifted_is_told_to_pin_not_to_opt_in(monkeypatch):
    from transformers.modeling_utils import PreTrainedModel

    def _initialize_missing_keys(self, is_quantized, new_argument=None):  # a release that changed the signature
        return None

    _newer_release(monkeypatch)
    monkeypatch.setattr(PreTrainedModel, "_initialize_missing_keys", _initialize_missing_keys)
    for allow in (False, True):  # the advice is the same with or without the opt-in, because it is the cause
        with pytest.raises(TargetDriftError) as raised:
            with ep_ds_shim.ep_zero3_compat(allow_unverified=allow):
                pass
        message = str(raised.value)
        assert "_initialize_missing_keys" in message and "new_argument" in message  # what changed
        assert "pip install 'transformers" in message and "no opt-in" in message  # what to pin
        assert "allow_unverified" not in message and "EP_DS_SHIM_ALLOW_UNVERIFIED" not in message


def test_a_newer_release_that_did_not_drift_may_be_verified_and_opted_in(monkeypatch):
    _newer_release(monkeypatch)
    with pytest.raises(UnsupportedReleaseError, match="ep_ds_shim verify") as raised:
        with ep_ds_shim.ep_zero3_compat():
            pass
    assert "allow_unverified=True" in str(raised.value)
    with ep_ds_shim.ep_zero3_compat(allow_unverified=True):  # and the advice works
        pass


def test_doctor_on_a_drifted_newer_release_says_pin(monkeypatch):
    from transformers.modeling_utils import PreTrainedModel

    import ep_ds_shim.doctor as doctor

    def _initialize_missing_keys(self, is_quantized, new_argument=None):
        return None

    monkeypatch.setattr(PreTrainedModel, "_initialize_missing_keys", _initialize_missing_keys)
    real_version = doctor._version
    monkeypatch.setattr(doctor, "_version", lambda name: "5.99.0" if name == "transformers" else real_version(name))
    report = doctor.diagnose()
    release = next(item for item in report["problems"] if "5.99.0" in item["problem"])
    assert "no opt-in can work" in release["what_to_do"] and "pip install 'transformers" in release["what_to_do"]
    assert "ALLOW_UNVERIFIED" not in release["what_to_do"]
