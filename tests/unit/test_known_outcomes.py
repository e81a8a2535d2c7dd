"""The table of known verify outcomes (ep_ds_shim/verify/known.py): every entry's cause still reproduces on the
installed release (else the entry is stale: upstream fixed it, so remove or narrow it), and an entry explains only
the failure it describes."""

from __future__ import annotations

import pytest
from packaging.version import Version

from ep_ds_shim.releases.support import transformers_version
from ep_ds_shim.verify import known, report
from ep_ds_shim.verify.known import KNOWN


def _cases():
    for index, entry in enumerate(KNOWN):
        for model_type in entry.model_types:
            yield pytest.param(entry, model_type, id=f"{index}-{entry.kind}-{model_type}")


@pytest.mark.parametrize("entry,model_type", list(_cases()))
def test_every_known_entry_still_reproduces(entry, model_type, tmp_path):
    from ep_ds_shim.testing import tiny_models

    version = transformers_version()
    if Version(version) not in entry.releases:
        pytest.skip(f"the entry covers transformers {entry.releases}, this is {version}")
    if model_type not in tiny_models.ep_model_types():
        pytest.fail(f"{model_type} has no EP plan in transformers {version}: the entry is stale")
    if entry.kind == "environment":
        pytest.skip("an environment entry holds only where the package is missing; its probe says so")  # see below
    path = tiny_models.build_tiny_model(tmp_path / model_type, model_type, num_experts=4)
    evidence = entry.probe(model_type, path)
    assert evidence, f"{model_type}: the cause of known entry {entry.reason!r} no longer reproduces: remove it"


def test_environment_entry_holds_exactly_where_the_package_is_missing(monkeypatch):
    import importlib.util

    entry = next(entry for entry in KNOWN if entry.kind == "environment")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real(name, *a))
    assert "pip install scipy" in entry.probe(entry.model_types[0], None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert entry.probe(entry.model_types[0], None) is None


def test_scipy_is_what_that_family_needs():
    """The environment entry's claim, checked where it can be: without scipy the family's model cannot be built."""
    import importlib.util

    from ep_ds_shim.testing import tiny_models

    entry = next(entry for entry in KNOWN if entry.kind == "environment")
    model_type = entry.model_types[0]
    if model_type not in tiny_models.ep_model_types() or importlib.util.find_spec("scipy") is not None:
        pytest.skip("needs the family and an environment without scipy")
    with pytest.raises(ModuleNotFoundError, match="scipy"):
        tiny_models.model_class_for(model_type)(tiny_models.tiny_config(model_type))


def _everyone(label: str, by_check: dict) -> dict:
    return {rank: {label: by_check} for rank in (0, 1)}


def test_a_known_entry_explains_only_its_own_failure():
    version = transformers_version()
    refusal = {"ok": False, "error": "EPRequestError: MuseSparkForConditionalGeneration (...): its expert-parallel "
                                     "plan keeps 'x' replicated (...) ('replicated_with_grad_allreduce')"}
    crash = {"ok": False, "error": "RuntimeError: something else broke"}
    not_run = {"ok": False, "error": "not run: the training step did not complete"}
    targets = {"muse_spark": ("muse_spark", None)}
    explained = report.classify(_everyone("muse_spark", {"load": refusal, "step": refusal, "export": not_run}),
                                targets, version)
    from ep_ds_shim.testing import tiny_models

    if Version(version) in KNOWN[0].releases and "muse_spark" in tiny_models.ep_model_types():
        assert {c: o["outcome"] for c, o in explained["muse_spark"].items()} == dict.fromkeys(known.CHECKS, "known")
    other = report.classify(_everyone("muse_spark", {"load": crash, "step": crash, "export": not_run}), targets,
                            version)
    assert {c: o["outcome"] for c, o in other["muse_spark"].items()} == dict.fromkeys(known.CHECKS, "FAIL")
    assert not report.no_fail(other) and report.counts(other) == {"pass": 0, "known": 0, "FAIL": 3}


def test_a_failure_of_a_family_without_an_entry_is_a_FAIL():
    drift = {"ok": False, "grads": 2e-3}
    fine = {"ok": True, "logits": 1e-7}
    outcomes = report.classify(_everyone("qwen3_moe", {"load": fine, "step": drift, "export": fine}),
                               {"qwen3_moe": ("qwen3_moe", None)}, transformers_version())
    assert {c: o["outcome"] for c, o in outcomes["qwen3_moe"].items()} == {"load": "pass", "step": "FAIL",
                                                                         "export": "pass"}
    assert report.summary(outcomes) == "1 model type(s), 3 checks: 2 pass, 0 known, 1 FAIL"
