"""The one table of known `verify` outcomes: documented refusals and upstream defects, each with its evidence.

A failed check is "known" only when all of these hold: an entry names its model type and check, the installed
transformers is in the entry's releases, the failure reads as the entry says (`signature`), and the entry's probe
reproduces the cause on this machine right now, without ep-ds-shim in the way where the cause is upstream. Anything
else is a FAIL. So an entry cannot hide a different failure, and it stops counting the day upstream fixes the cause
(tests/unit/test_known_outcomes.py runs every probe on the installed release, so the table is pruned then too).

Kinds:
  refused       ep-ds-shim refuses the family on purpose, before any weight is read (the reason says why);
  upstream      transformers itself fails the same way with no ep-ds-shim and no DeepSpeed;
  environment   the family needs a package this environment does not have (install it to check the family).
"""

from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from packaging.specifiers import SpecifierSet
from packaging.version import Version

CHECKS = ("load", "step", "export")


@dataclass(frozen=True)
class Known:
    model_types: tuple[str, ...]
    checks: tuple[str, ...]
    releases: SpecifierSet  # transformers releases where it was measured (the probe decides on the day)
    kind: str  # "refused" | "upstream" | "environment"
    reason: str
    signature: str  # a regular expression the failure text must match
    probe: Callable[[str, Path | None], str | None]  # (model type, its tiny checkpoint) -> evidence, or None

    def applies(self, model_type: str, check: str, version: str, failure: str) -> bool:
        return (model_type in self.model_types and check in self.checks and Version(version) in self.releases
                and re.search(self.signature, failure) is not None)


def _plan_refusal(model_type: str, _path) -> str | None:
    """The library's own pre-load refusal of this family's EP plan (loading/request.py), as it reads today."""
    from ..loading.request import plan_refusal
    from ..testing import tiny_models

    refusal = plan_refusal(tiny_models.model_class_for(model_type), tiny_models.tiny_config(model_type))
    return f"refused before any weight is read: {refusal}" if refusal else None


def _round_trip(model_type: str, path: Path | None) -> str | None:
    """transformers alone: a single-process from_pretrained -> save_pretrained -> from_pretrained of the tiny
    checkpoint (no ep-ds-shim, no DeepSpeed, no EP) loses or changes keys."""
    import tempfile

    import torch

    from ..testing import tiny_models

    if path is None:
        return None
    model_class = tiny_models.model_class_for(model_type)
    model = model_class.from_pretrained(path, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as saved:
        model.save_pretrained(saved)
        _, info = model_class.from_pretrained(saved, dtype=torch.float32, output_loading_info=True)
    problems = {key: sorted(map(str, value)) for key, value in info.items() if value}
    if not problems:
        return None
    key, names = next(iter(problems.items()))
    return (f"transformers alone (one process, no EP, no DeepSpeed): from_pretrained -> save_pretrained -> "
            f"from_pretrained of the tiny {model_type} reports {len(names)} {key}, e.g. {names[0]}")


def _missing_module(module: str) -> Callable[[str, Path | None], str | None]:
    def probe(model_type: str, _path) -> str | None:
        if importlib.util.find_spec(module) is not None:
            return None
        return (f"{module} is not installed here; transformers' {model_type} modeling code imports it (transformers "
                f"does not require it). `pip install {module}` to check this family")
    return probe


KNOWN: tuple[Known, ...] = (
    Known(
        ("muse_spark",), CHECKS, SpecifierSet(">=5.20"), "refused",
        "its EP plan keeps a norm inside the experts replicated, with its gradient summed over the EP group "
        "(replicated_with_grad_allreduce); DeepSpeed never does that sum, so training would be silently wrong",
        r"EPRequestError: .*replicated_with_grad_allreduce|not run", _plan_refusal,
    ),
    Known(
        ("gemma4", "gemma4_text", "diffusion_gemma"), CHECKS, SpecifierSet(">=5.20"), "refused",
        "its EP plan also splits the dense MLP weights over the EP ranks (colwise / rowwise rules); ep-ds-shim keeps "
        "dense weights whole for ZeRO-3, which partitions them itself",
        r"EPRequestError: .*splits dense weights|not run", _plan_refusal,
    ),
    Known(
        ("sarvam_moe",), ("export",), SpecifierSet(">=5.24"), "upstream",
        "transformers' own save -> load round trip of this family loses keys (the saved config names glm4_moe); "
        "the export writes what transformers' save_pretrained writes, so it inherits that",
        r"loading_problems=.*missing_keys", _round_trip,
    ),
    Known(
        ("param2moe",), ("export",), SpecifierSet(">=5.25"), "upstream",
        "transformers' own save -> load round trip of this family loses keys; the export writes what transformers' "
        "save_pretrained writes, so it inherits that",
        r"loading_problems=.*missing_keys", _round_trip,
    ),
    Known(
        ("inkling2",), ("export",), SpecifierSet("==5.23.*"), "upstream",
        "transformers 5.23's own save -> load round trip of this family fails; the export writes what transformers' "
        "save_pretrained writes, so it inherits that",
        r"loading_problems=|Error", _round_trip,
    ),
    Known(
        ("inkling_mm_model",), CHECKS, SpecifierSet(">=5.23"), "environment",
        "its modeling code needs scipy, which neither transformers nor ep-ds-shim requires",
        r"No module named 'scipy'", _missing_module("scipy"),
    ),
)


def find(model_type: str, check: str, version: str, failure: str) -> Known | None:
    """The entry that may explain this failure (its probe still has to reproduce the cause: `evidence`)."""
    return next((entry for entry in KNOWN if entry.applies(model_type, check, version, failure)), None)


@functools.lru_cache(maxsize=None)
def _evidence(entry_index: int, model_type: str, path: str | None) -> str | None:
    entry = KNOWN[entry_index]
    try:
        return entry.probe(model_type, Path(path) if path else None)
    except Exception:  # noqa: BLE001 - a probe that cannot run proves nothing: the failure stays a FAIL
        return None


def evidence(entry: Known, model_type: str, path: Path | None) -> str | None:
    """What shows `entry`'s cause on this machine now, or None when it no longer reproduces (then: FAIL)."""
    return _evidence(KNOWN.index(entry), model_type, str(path) if path else None)
