"""`python -m ep_ds_shim doctor [--json]`: what the shim would do on this machine, and why.

Exit status 0 when the shim would patch (or knows upstream no longer needs it) and DeepSpeed is in the verified
range; 1 when something would make it refuse.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _distributed_environment() -> dict:
    import torch.distributed as dist

    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")
    env = {key: os.environ[key] for key in keys if key in os.environ}
    env.update({key: value for key, value in os.environ.items() if key.startswith("ACCELERATE_")})
    initialised = dist.is_available() and dist.is_initialized()
    return {
        "environment": env,
        "process_group_initialised": initialised,
        "world_size": dist.get_world_size() if initialised else None,
        "rank": dist.get_rank() if initialised else None,
    }


def diagnose() -> dict:
    """Everything the doctor reports, as data."""
    from . import _install, matrix
    from ._releases import VERIFIED_DEEPSPEED, VERIFIED_TRANSFORMERS, check_deepspeed
    from .errors import EpShimError

    report: dict = {
        "versions": {
            "python": platform.python_version(),
            **{name: _version(name) for name in ("torch", "transformers", "deepspeed", "accelerate", "wrapt")},
            "ep-ds-shim": _version("ep-ds-shim"),
        },
        "verified_transformers": str(VERIFIED_TRANSFORMERS),
        "verified_deepspeed": str(VERIFIED_DEEPSPEED),
        "problems": [],
    }
    transformers_version = report["versions"]["transformers"]
    report["matrix"] = matrix.row_for(transformers_version) if transformers_version else None
    try:
        plan = _install.make_plan()
    except EpShimError as error:
        report["transformers_supported"] = False
        report["problems"].append(str(error))
        plan = None
    if plan is not None:
        report["transformers_supported"] = True
        report["family"] = plan.family.name
        from .spelling import SPELLINGS

        report["ep_spelling"] = SPELLINGS.get(plan.family.spelling, plan.family.spelling)
        report["dp_x_ep"] = plan.family.dp_x_ep
        checks = [(_install._load.ENTRY.qualname, "entry", plan.entry)]
        checks += [(gate.target.qualname, gate.name, report_) for gate, report_ in plan.gates]
        if plan.mesh is not None:
            checks.append((plan.mesh[0].target.qualname, plan.mesh[0].name, plan.mesh[1]))
        if plan.legacy_flag is not None:
            checks.append((plan.legacy_flag.target.qualname, "DistributedConfig.__post_init__ (legacy EP flag)",
                           plan.legacy_flag))
        report["gates"] = [
            {
                "target": qualname,
                "gate": name,
                "ok": shape.ok,
                "kind": shape.found_kind,
                "params": list(shape.found_params) if shape.found_params else None,
                "consults_zero3": shape.consults_zero3,
                "ep_aware_upstream": shape.ep_aware,
                "problem": shape.problem,
            }
            for qualname, name, shape in checks
        ]
        report["zero3_question_patched_in"] = plan.question_namespaces
        report["upstream_fixed"] = plan.upstream_fixed
        report["problems"] += plan.problems
        if plan.partly_fixed:
            report["problems"].append("some gates already handle EP upstream and others do not (unverified)")
    if transformers_version:
        from ._releases import training_defect

        report["training_refused"] = training_defect(transformers_version)
    try:
        check_deepspeed(report["versions"]["deepspeed"])
        report["deepspeed_supported"] = True
    except EpShimError as error:
        report["deepspeed_supported"] = False
        report["problems"].append(str(error))
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        report["zero3_signalled"] = bool(is_deepspeed_zero3_enabled())
    except ImportError as error:
        report["zero3_signalled"] = f"unknown ({error})"
    report["distributed"] = _distributed_environment()
    report["ok"] = not report["problems"]
    return report


def _print_human(report: dict) -> None:
    out = sys.stdout.write
    out("ep-ds-shim doctor\n")
    out("  versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in report["versions"].items()) + "\n")
    out(f"  verified: transformers {report['verified_transformers']}, deepspeed {report['verified_deepspeed']}\n")
    supported = report.get("transformers_supported")
    out(f"  transformers release supported: {'yes' if supported else 'NO'}")
    if supported:
        out(f" (family {report['family']}; DP x EP with world > ep: {report['dp_x_ep'] or 'not supported'})\n")
        out(f"  EP of size N on this release: {report['ep_spelling']}\n"
            "      (ep_ds_shim.ep_from_pretrained_kwargs(path, ep_size=N) builds it)")
    out("\n")
    row = report.get("matrix")
    if row:
        out("  verified by the matrix for this release:\n")
        from .matrix import COLUMNS

        for model, cells in row["models"].items():
            out(f"    {model:<12} " + "  ".join(f"{k}={cells.get(k)}" for k in COLUMNS) + "\n")
        for note in row.get("notes", []):
            out(f"    note: {note}\n")
    else:
        out("  verified by the matrix for this release: no row (not run by the matrix)\n")
    if report.get("training_refused"):
        out(f"  DeepSpeed training of EP models is refused on this release: {report['training_refused']}\n")
    if report.get("upstream_fixed"):
        out("  upstream already routes EP under ZeRO-3 through the standard path: the shim patches nothing\n")
    for gate in report.get("gates", []):
        status = "ok" if gate["ok"] else "DRIFT"
        extra = " (upstream already EP-aware)" if gate.get("ep_aware_upstream") else ""
        out(f"  check {gate['gate']:<48} {status}{extra}\n")
        if gate["problem"]:
            out(f"      {gate['problem']}\n")
    out(f"  ZeRO-3 signalled right now: {report['zero3_signalled']}\n")
    dist = report["distributed"]
    out(f"  torch.distributed initialised: {dist['process_group_initialised']}; environment: {dist['environment'] or '{}'}\n")
    if report["problems"]:
        out("  the shim would refuse:\n")
        for problem in report["problems"]:
            out("    - " + problem.replace("\n", "\n      ") + "\n")
    else:
        out("  result: OK\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ep_ds_shim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser("doctor", help="report versions, support, gate shape checks and environment")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    report = diagnose()
    if args.json:
        json.dump(report, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
    else:
        _print_human(report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
