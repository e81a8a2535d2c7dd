"""transformers' own requirements: read from real distribution metadata (a stand-in distribution on the path for
the cases this machine does not have), reported by the doctor with what to do, and the advice checked against the
installed transformers where its requirement is really unmet."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ep_ds_shim.releases import requirements

STAND_IN = "ep-shim-fake-transformers"


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """A distribution on sys.path whose metadata declares `requires` (what importlib.metadata reads for real)."""

    def make(*requires: str, version: str = "9.0.0") -> str:
        info = tmp_path / f"{STAND_IN.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        lines = ["Metadata-Version: 2.1", f"Name: {STAND_IN}", f"Version: {version}",
                 *(f"Requires-Dist: {r}" for r in requires)]
        (info / "METADATA").write_text("\n".join(lines) + "\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        return STAND_IN

    return make


def test_unmet_found_expected_and_what_to_do(stand_in, monkeypatch):
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    name = stand_in("packaging>=1", "kernels<0.20,>=0.19.1", "ep-shim-no-such-package>=1",
                    "packaging>=999; extra == 'never'", 'ep-shim-no-such-package; python_version < "3"',
                    "packaging>=999")
    unmet = {str(u.requirement): u for u in requirements.unmet_requirements(name)}
    installed_kernels = requirements._installed("kernels")
    expected = {"ep-shim-no-such-package>=1", "packaging>=999"}
    if not requirements._satisfies(installed_kernels, requirements.Requirement("kernels<0.20,>=0.19.1")):
        expected.add("kernels<0.20,>=0.19.1")
    assert set(unmet) == expected  # extras and markers that do not hold here are not requirements
    assert unmet["packaging>=999"].found  # installed, too old: the version found is named
    assert "packaging>=999 (packaging" in unmet["packaging>=999"].describe()
    assert unmet["ep-shim-no-such-package>=1"].found is None
    assert "(not installed)" in unmet["ep-shim-no-such-package>=1"].describe()
    assert unmet["packaging>=999"].advice() == "pip install 'packaging>=999'"
    if "kernels<0.20,>=0.19.1" in unmet:
        kernels = unmet["kernels<0.20,>=0.19.1"]
        assert not kernels.switched_off and "Kernels are not available" in kernels.describe()
        assert "pip install 'kernels<0.20,>=0.19.1'" in kernels.advice() and "USE_HUB_KERNELS=0" in kernels.advice()
        assert requirements.switches_needed(name) == {"USE_HUB_KERNELS": "0"}


def test_an_integration_outside_its_extras_range_is_named_with_both_ways_out(stand_in):
    """transformers imports an integration (kernels) whenever it is installed: the range of the extra named after it
    counts then, and only then (other extras, packages not installed, requirements are not this check's)."""
    import packaging

    name = stand_in("packaging<1; extra == 'packaging'", "packaging>=999; extra == 'all'",
                    "ep-shim-no-such-package<1; extra == 'ep-shim-no-such-package'", "pytest>=1; extra == 'pytest'",
                    "wrapt>=999", "wrapt>=999; extra == 'wrapt'")
    [stale] = requirements.integrations_out_of_range(name)
    assert (stale.requirement.name, str(stale.requirement.specifier), stale.found) == ("packaging", "<1",
                                                                                       packaging.__version__)
    assert stale.switch is None and stale.extra == "packaging"
    assert stale.describe() == (f"packaging {packaging.__version__} is installed, outside the range {name} 9.0.0 "
                                "declares for it (its `packaging` extra: packaging<1); "
                                f"{name} imports packaging whenever it is installed")
    assert stale.advice() == "pip uninstall -y packaging, or pip install 'packaging<1'"
    assert [str(u.requirement) for u in requirements.unmet_requirements(name)] == ["wrapt>=999"]


@pytest.mark.parametrize("value, off", [(None, False), ("1", False), ("YES", False), ("on", False), ("0", True),
                                        ("NO", True), ("false", True)])
def test_the_switch_reads_like_transformers(monkeypatch, value, off):
    if value is None:
        monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    else:
        monkeypatch.setenv("USE_HUB_KERNELS", value)
    assert requirements.SWITCHES["kernels"].is_off() is off


def _doctor(env_changes: dict) -> tuple[int, str, dict]:
    env = _environment(env_changes)
    human = subprocess.run([sys.executable, "-m", "ep_ds_shim", "doctor"], capture_output=True, text=True, env=env)
    data = subprocess.run([sys.executable, "-m", "ep_ds_shim", "doctor", "--json"], capture_output=True, text=True,
                          env=env)
    return human.returncode, human.stdout, json.loads(data.stdout)


def _environment(changes: dict) -> dict:
    env = {**os.environ, **{k: v for k, v in changes.items() if v is not None}}
    for key in [k for k, v in changes.items() if v is None]:
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def kernels_unmet(tmp_path_factory) -> dict:
    """Environment changes under which the installed transformers' kernels requirement is unmet: none where it is
    unmet already; else a kernels release below the requirement, from the package index, first on the path
    (PYTHONPATH: both the import and importlib.metadata read it), as on an index that tops out below it."""
    required = [r for r in requirements.applicable_requirements("transformers")[1] if r.name == "kernels"]
    if not required:
        pytest.skip("the installed transformers does not require kernels")
    if any(u.requirement.name == "kernels" for u in requirements.unmet_requirements()):
        return {}
    floors = [s.version for s in required[0].specifier if s.operator in (">=", ">")]
    older = tmp_path_factory.mktemp("older-kernels")
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(older),
                          f"kernels<{floors[0]}"], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    path = os.pathsep.join(p for p in (str(older), os.environ.get("PYTHONPATH")) if p)
    found = subprocess.run([sys.executable, "-c", "from ep_ds_shim.releases import requirements as r; "
                            "print([str(u.requirement) for u in r.unmet_requirements()])"],
                           capture_output=True, text=True, env=_environment({"PYTHONPATH": path}))
    assert "kernels" in found.stdout, found.stdout + found.stderr
    return {"PYTHONPATH": path}


def test_doctor_is_not_ok_while_transformers_would_fail(kernels_unmet):
    code, human, report = _doctor({**kernels_unmet, "USE_HUB_KERNELS": None})
    assert code == 1 and not report["ok"]
    assert "imports: all ok" not in human and "result: OK" not in human
    assert "transformers requirement UNMET: kernels" in human and "NOT switched off" in human
    [problem] = [p for p in report["problems"] if "kernels" in p["problem"]]
    assert "Kernels are not available" in problem["problem"] and "USE_HUB_KERNELS=0" in problem["what_to_do"]


def test_doctor_with_the_advised_switch_says_what_it_runs_without(kernels_unmet):
    code, human, report = _doctor({**kernels_unmet, "USE_HUB_KERNELS": "0"})
    assert not [p for p in report["problems"] if "kernels" in p["problem"]]
    assert report["requirements_unmet"][0]["switched_off"] is True
    assert "USE_HUB_KERNELS=0 is set, so transformers runs without it" in human
    if report["ok"]:
        assert code == 0 and "result: OK, with USE_HUB_KERNELS=0 (no kernels" in human


LOAD = """
import sys
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
except ValueError as error:
    print("FAILED", error)
else:
    print("LOADED")
"""


def test_the_advice_works_and_the_problem_is_real(tiny_checkpoint, kernels_unmet):
    """What the doctor says, measured: without the switch every load fails; with it the load works."""
    path = str(tiny_checkpoint("qwen3_moe"))

    def load(switch):
        env = _environment({**kernels_unmet, "USE_HUB_KERNELS": switch})
        out = subprocess.run([sys.executable, "-c", LOAD, path], capture_output=True, text=True, env=env)
        return out.stdout.strip().splitlines()[-1]

    assert load(None).startswith("FAILED Kernels are not available")
    assert load("0") == "LOADED"
