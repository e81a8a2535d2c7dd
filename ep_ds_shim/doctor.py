"""`python -m ep_ds_shim doctor [--json]`: what the shim would do on this machine, and why.

It imports what it reports (a version read from metadata says nothing about whether the package works), checks
transformers' own requirements (an import does not show them unmet: `releases/requirements.py`), runs every shape
check even on a release the shim would refuse, and says each problem once, with what to do.
Exit status 0 when the shim would work here, 1 when something would make it refuse or make transformers fail.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
from importlib import metadata

from .releases import requirements, support, support_table
from .version import __version__

# What the documented paths need at run time, in the order a broken one explains the rest (accelerate: transformers'
# EP load needs it for its device map; every one of them is a requirement of the ep-ds-shim package).
DEPENDENCIES = ("torch", "wrapt", "transformers", "deepspeed", "accelerate")


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _import_problem_text(error: BaseException) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line}"[:300]


def _import_problem(module: str) -> str | None:
    """None when `module` imports; else one line saying why not."""
    try:
        importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - any import failure is what the doctor reports
        return _import_problem_text(error)
    return None


def _distributed_environment() -> dict:
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")
    env = {key: os.environ[key] for key in keys if key in os.environ}
    env.update({key: value for key, value in os.environ.items() if key.startswith("ACCELERATE_")})
    report = {"environment": env, "process_group_initialised": False, "world_size": None, "rank": None}
    torch_distributed = sys.modules.get("torch.distributed")
    if torch_distributed is not None and torch_distributed.is_available() and torch_distributed.is_initialized():
        report.update(process_group_initialised=True, world_size=torch_distributed.get_world_size(),
                      rank=torch_distributed.get_rank())
    return report


def diagnose() -> dict:
    """Everything the doctor reports, as data. Problems: (what is wrong, what to do), each once."""
    versions = {"python": platform.python_version(),
                **{name: _version(name) for name in DEPENDENCIES}, "ep-ds-shim": __version__}
    report: dict = {
        "versions": versions,
        "verified_transformers": str(support.VERIFIED_TRANSFORMERS),
        "verified_deepspeed": str(support.VERIFIED_DEEPSPEED),
        "imports": {},
        "problems": [],
    }
    problems = report["problems"]

    def problem(text: str, todo: str) -> None:
        if not any(p["problem"] == text for p in problems):
            problems.append({"problem": text, "what_to_do": todo})

    causes: dict[str, str] = {}  # a failure already reported -> the package it belongs to
    for name in DEPENDENCIES:
        failure = _import_problem(name)
        if failure in causes:  # e.g. DeepSpeed fails only because torch does: say it once, at its cause
            report["imports"][name] = f"fails because {causes[failure]} does not import"
            continue
        report["imports"][name] = failure or "ok"
        if failure:
            causes[failure] = name
        if failure:
            installed = versions.get(name)
            problem(f"{name} {'is not installed' if installed is None else installed + ' does not import'}: {failure}",
                    f"pip install '{_declared(name)}' (ep-ds-shim requires it), then run the doctor again")
    broken = {name for name in DEPENDENCIES if report["imports"][name] != "ok"}
    _requirements(report, problem)

    transformers_version = versions["transformers"]
    release_problem = None
    if transformers_version:
        try:
            support.check_transformers(transformers_version)
            report["transformers_supported"] = True
        except Exception as error:  # noqa: BLE001 - UnsupportedReleaseError, reported as data
            report["transformers_supported"] = False
            release_problem = str(error).split(". ")[0] + "."
            problem(release_problem, _release_advice(transformers_version))
        report["training_refused"] = support.training_defect(transformers_version)
        try:
            report["matrix"] = support_table.row_for(transformers_version)
        except Exception as error:  # noqa: BLE001 - a broken install: say it, keep diagnosing
            report["matrix"] = None
            problem(str(error), "reinstall ep-ds-shim")
    if not broken & {"torch", "wrapt", "transformers"}:
        try:
            _shape_checks(report, transformers_version, problem)
        except Exception as error:  # noqa: BLE001 - e.g. transformers' DeepSpeed integration needs a broken accelerate
            problem(f"the shape checks could not run: {_import_problem_text(error)}",
                    "fix the import reported above, then run the doctor again")
        if report.get("transformers_supported") is False and not all(c["ok"] for c in report.get("checks", [])):
            for item in problems:
                if item["problem"] == release_problem:
                    item["what_to_do"] = _release_advice(transformers_version, drifted=True)
    if "deepspeed" not in broken:
        try:
            support.check_deepspeed(versions["deepspeed"])
            report["deepspeed_supported"] = True
        except Exception as error:  # noqa: BLE001
            report["deepspeed_supported"] = False
            problem(str(error), f"install DeepSpeed {support.VERIFIED_DEEPSPEED}")
    report["distributed"] = _distributed_environment()
    report["ok"] = not problems
    return report


def _requirements(report: dict, problem) -> None:
    """transformers' own requirements: an import does not show them unmet (transformers 5.25 without kernels>=0.19.1
    imports, then fails every from_pretrained unless USE_HUB_KERNELS switches hub kernels off); and the integrations
    it imports whenever installed, outside the range it declares for them (5.6 beside kernels 0.19.1 fails every
    import of a model class)."""
    report["requirements_unmet"] = []
    for unmet in requirements.unmet_requirements("transformers"):
        switch = unmet.switch
        report["requirements_unmet"].append({
            "requirement": str(unmet.requirement), "found": unmet.found,
            "switch": f"{switch.variable}={switch.off}" if switch else None, "switched_off": unmet.switched_off,
        })
        if not unmet.switched_off:
            problem(unmet.describe(), unmet.advice())
    report["integrations_out_of_range"] = []
    for stale in requirements.integrations_out_of_range("transformers"):
        report["integrations_out_of_range"].append({
            "installed": f"{stale.requirement.name} {stale.found}", "declared": str(stale.requirement)})
        problem(stale.describe(), stale.advice())
    report["unmeasured"] = requirements.features_on("transformers")


def _declared(name: str) -> str:
    """ep-ds-shim's own requirement on `name` as the installed package declares it (else the bare name)."""
    from packaging.requirements import Requirement

    for text in (metadata.requires("ep-ds-shim") if _version("ep-ds-shim") else None) or []:
        requirement = Requirement(text)
        if requirement.name.lower() == name and not requirement.marker:
            return str(requirement)
    return name


def _release_advice(version: str, drifted: bool = False) -> str:
    pin = f"pip install 'transformers{support.VERIFIED_TRANSFORMERS}'"
    if support.refusal_for(version):
        return f"install a supported release: {pin}"
    if drifted:  # the opt-in would be refused at the shape checks below: only pinning works
        return (f"this release changed code the shim patches (the DRIFT lines below), so no opt-in can work: pin a "
                f"verified release: {pin}")
    return (f"check this release on your machines with `torchrun --nproc_per_node 2 -m ep_ds_shim verify`; if it "
            f"passes, opt in with {support.ALLOW_UNVERIFIED_ENV}=1 or ep_zero3_compat(allow_unverified=True); or "
            f"pin a verified release: {pin}")


def _shape_checks(report: dict, version: str, problem) -> None:
    """Every shape check and the EP spelling, also on a release the shim would refuse."""
    from .errors import UnsupportedReleaseError
    from .loading import patches  # imports transformers: only once the doctor knows it imports
    from .loading.context import LOADING
    from .patching.installer import make_plan
    from .releases.lines import release_line_for

    try:
        line = release_line_for(version)
    except UnsupportedReleaseError:
        line = None
    report["release_line"] = line.name if line else None
    if line is not None:  # beyond upstream defects: releases without the token dispatcher cannot train either
        from .releases.lines import training_refusal

        report["training_refused"] = training_refusal(version)
    report["ep_spelling"] = line.spelling.summary if line else None
    report["dp_x_ep"] = bool(line and line.replica_mesh)
    plan = make_plan(patches.POINTS, LOADING, line)
    report["checks"] = [
        {"point": item.point.name, "role": item.point.role, "target": item.target.qualname, "ok": item.report.ok,
         "kind": item.report.found_kind, "params": list(item.report.found_params or ()),
         "upstream_aware": item.report.upstream_aware, "wrapped_by": item.report.wrapped_by,
         "problem": item.report.problem}
        for item in plan.items
    ]
    report["zero3_question_patched_in"] = [item.target.owner for item in plan.items if item.point.role == "question"]
    report["upstream_fixed"] = plan.upstream_fixed
    for item in plan.items:
        if not item.report.ok:
            problem(item.report.problem, _drift_advice(bool(item.report.wrapped_by)))
    for text in plan.extra_problems:
        problem(text, _drift_advice(True))
    if plan.partly_fixed:
        problem("some ZeRO-3 gates already handle EP upstream and others do not (never verified)",
                "pin a verified release and report this release to ep-ds-shim")
    from .loading.zero3_question import zero3_signalled

    report["zero3_signalled"] = zero3_signalled()


def _drift_advice(foreign: bool) -> str:
    if foreign:
        return ("another library patched this function; ep-ds-shim does not wrap another library's wrapper: "
                "disable that patch while loading, or apply it after the block")
    return (f"this transformers release changed code the shim patches: pin a verified release "
            f"(transformers{support.VERIFIED_TRANSFORMERS}) and report the release with this output")


def print_human(report: dict) -> None:
    out = sys.stdout.write
    out("ep-ds-shim doctor\n")
    out("  versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in report["versions"].items()) + "\n")
    broken = {name: status for name, status in report["imports"].items() if status != "ok"}
    unmet = report.get("requirements_unmet", [])
    imports = "; ".join(f"{k}: {v}" for k, v in broken.items()) if broken else "all import"
    out("  imports: " + (imports if broken or unmet or report.get("integrations_out_of_range") else "all ok") + "\n")
    for item in unmet:
        found = f"{item['found']} installed" if item["found"] else "not installed"
        state = (f"; {item['switch']} is set, so transformers runs without it" if item["switched_off"] else
                 f"; NOT switched off ({item['switch']} would)" if item["switch"] else "")
        out(f"  transformers requirement UNMET: {item['requirement']} ({found}){state}\n")
    for item in report.get("integrations_out_of_range", []):
        out(f"  transformers integration OUT OF RANGE: {item['installed']} (declared: {item['declared']})\n")
    out(f"  verified: transformers {report['verified_transformers']}, deepspeed {report['verified_deepspeed']}\n")
    if "transformers_supported" in report:
        out(f"  transformers release verified: {'yes' if report['transformers_supported'] else 'NO'}\n")
    if report.get("release_line"):
        out(f"  strategy: release line {report['release_line']} (DP x EP with world > ep: "
            f"{'yes' if report['dp_x_ep'] else 'refused'})\n")
        out(f"  EP of size N on this release: {report['ep_spelling']}\n"
            "      (ep_ds_shim.ep_from_pretrained_kwargs(path, ep_size=N) builds it)\n")
    elif "release_line" in report:
        out("  strategy: none (this release is refused; the checks below are for information)\n")
    row = report.get("matrix")
    if row:
        out("  verified by the matrix for this release:\n")
        for model, cells in row["models"].items():
            out(f"    {model:<12} " + "  ".join(f"{k}={cells.get(k, '-')}" for k in support_table.COLUMNS) + "\n")
    elif "matrix" in report:
        out("  verified by the matrix for this release: no row (the matrix did not run it)\n")
    if report.get("training_refused"):
        out(f"  DeepSpeed training of EP models is refused on this release: {report['training_refused']}\n")
    if report.get("upstream_fixed"):
        out("  upstream already routes EP under ZeRO-3 through the standard path: the loading block patches nothing\n")
    width = max((len(check["target"]) for check in report.get("checks", [])), default=0)
    for check in report.get("checks", []):
        status = "ok" if check["ok"] else ("WRAPPED BY ANOTHER LIBRARY" if check["wrapped_by"] else "DRIFT")
        extra = " (upstream already EP-aware)" if check.get("upstream_aware") else ""
        out(f"  check {check['role']:<8} {check['target']:<{width}} {status}{extra}\n")
    if "zero3_signalled" in report:
        out(f"  ZeRO-3 signalled right now: {report['zero3_signalled']}\n")
    dist = report["distributed"]
    out(f"  torch.distributed initialised: {dist['process_group_initialised']}; environment: {dist['environment'] or '{}'}\n")
    if report["problems"]:
        out("  problems (the shim would refuse, or transformers would fail):\n")
        for item in report["problems"]:
            out("    - " + item["problem"].replace("\n", "\n      ") + "\n")
            out("      what to do: " + item["what_to_do"] + "\n")
    else:
        switched = [f"{item['switch']} (no {item['requirement']})" for item in unmet]
        out("  result: OK" + (f", with {', '.join(switched)}" if switched else "") + "\n")
    for note in report.get("unmeasured", []):
        out(f"  note: {note}\n")
