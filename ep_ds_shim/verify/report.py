"""What `verify` concluded: one outcome per model type and check (pass, known, FAIL), the table and the summary."""

from __future__ import annotations

import sys

from ..releases.support import transformers_version
from . import figures, known
from .known import CHECKS

PASS, KNOWN, FAIL = "pass", "known", "FAIL"


def _merged(per_rank: list[dict]) -> tuple[bool, str | None, dict]:
    """(every rank passed, the first error, the worst figure of each name over the ranks)."""
    ok = all(result.get("ok") for result in per_rank)
    error = next((result["error"] for result in per_rank if result.get("error")), None)
    worst: dict = {}
    for result in per_rank:
        for key, value in result.items():
            if key.startswith("_"):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                worst[key] = max(worst.get(key, 0.0), float(value))
            elif key == "loading_problems" and value:
                worst[key] = value
    return ok, error, worst


def _figures_text(worst: dict) -> str:
    return " ".join(f"{key}={value:.1e}" if isinstance(value, float) else f"{key}={value}"
                    for key, value in worst.items())


def classify(everyone: dict, targets: dict, version: str | None = None) -> dict:
    """{label: {check: outcome}} from every rank's results. An outcome: {"outcome", "detail"} plus, when known,
    "kind", "reason" and "evidence"."""
    version = version or transformers_version()
    outcomes: dict = {}
    for label, (model_type, path) in targets.items():
        path = None if isinstance(path, Exception) else path
        by_check: dict = {}
        for check in CHECKS:
            per_rank = [everyone[rank][label].get(check, {}) for rank in sorted(everyone)]
            ok, error, worst = _merged(per_rank)
            detail = error or _figures_text(worst)
            if ok:
                by_check[check] = {"outcome": PASS, "detail": detail}
                continue
            by_check[check] = _explained(model_type, check, version, detail, path, by_check)
        outcomes[label] = by_check
    return outcomes


def _explained(model_type, check, version, detail, path, earlier) -> dict:
    entry = known.find(model_type, check, version, detail)
    if entry is not None and detail.startswith("not run") and not any(
            outcome["outcome"] == KNOWN for outcome in earlier.values()):
        entry = None  # "not run" is known only as the consequence of an earlier known outcome
    evidence = known.evidence(entry, model_type, path) if entry is not None else None
    if evidence is None:
        return {"outcome": FAIL, "detail": detail}
    return {"outcome": KNOWN, "detail": detail, "kind": entry.kind, "reason": entry.reason, "evidence": evidence}


def counts(outcomes: dict) -> dict[str, int]:
    tally = {PASS: 0, KNOWN: 0, FAIL: 0}
    for by_check in outcomes.values():
        for outcome in by_check.values():
            tally[outcome["outcome"]] += 1
    return tally


def no_fail(outcomes: dict) -> bool:
    return counts(outcomes)[FAIL] == 0


def summary(outcomes: dict) -> str:
    tally = counts(outcomes)
    return (f"{len(outcomes)} model type(s), {sum(tally.values())} checks: {tally[PASS]} pass, {tally[KNOWN]} known, "
            f"{tally[FAIL]} FAIL")


def print_report(outcomes: dict, layout, tolerance: float, held, *, verbose: bool = False, out=None) -> None:
    write = (out or sys.stdout).write
    write(f"ep-ds-shim verify: transformers {transformers_version()}, {layout.world_size} ranks "
          f"(dp={layout.dp_size} x ep={layout.ep_size})\n")
    write(f"tolerance: {figures.describe(tolerance)}\n")
    width = max([len("model type")] + [len(label) for label in outcomes])
    write(f"{'model type':<{width}} {'check':<7} {'result':<6} figures (max over ranks) or what happened\n")
    for label, by_check in outcomes.items():
        for check in (check for check in CHECKS if check in by_check):  # JSON exchanges sort the keys
            outcome = by_check[check]
            detail = outcome["detail"] if len(outcome["detail"]) <= 160 or verbose else outcome["detail"][:157] + "..."
            write(f"{label:<{width}} {check:<7} {outcome['outcome']:<6} {detail}\n")
    explained = {}
    for label, by_check in outcomes.items():
        for outcome in by_check.values():
            if outcome["outcome"] == KNOWN:
                explained.setdefault(label, outcome)
    if explained:
        write("known (ep_ds_shim/verify/known.py; not the shim failing here):\n")
        for label, outcome in explained.items():
            write(f"  {label}: {outcome['kind']}: {outcome['reason']}\n    evidence: {outcome['evidence']}\n")
    if held and sum(held.values()):
        write(f"held back: {sum(held.values())} warnings from other libraries "
              f"({', '.join(f'{n} {name}' for name, n in held.most_common())}); --verbose shows them\n")
    write(summary(outcomes) + "\n")
    (out or sys.stdout).flush()
