"""The support matrix: run every column of every row on real releases, and render the committed table.

    python tools/matrix.py run [RELEASE ...]       # default: the last patch of every verified minor
    python tools/matrix.py run 5.20.2 --wrapt 1.17.3 --deepspeed 0.19.3 --accelerate 1.16.0
    python tools/matrix.py run --newest            # the canary: the newest transformers on the package index
    python tools/matrix.py render [--fresh]        # build/matrix/*.json -> ep_ds_shim/releases/support_matrix.json,
                                                   #                        docs/support-matrix.md (--fresh: only them)
    python tools/matrix.py verdict 5.25.0          # exit 1 unless that row (in build/matrix) fails no column
    python tools/matrix.py check                   # rows just run == the committed table (CI)
    ./run.sh matrix 5.20.2                         # one release in the matrix environment, then checked

`run` swaps transformers (and optionally wrapt / DeepSpeed / accelerate) inside the environment it runs in
(./run.sh gives it build/venvs/matrix, never the project's .venv) with pip (transformers through
tools/releases.py install: a requirement the index cannot satisfy is named in the row, and the row runs with the
switch transformers has for it, e.g. USE_HUB_KERNELS=0), builds tiny checkpoints with that release, runs
tools/matrix_worker.py over 2 gloo ranks, writes build/matrix/<row>.json, and puts the pinned versions back.
A row on another torch (`--torch X`) is run by ./run.sh in an environment built with that torch.
The default rows are the declared releases (ep_ds_shim/releases/verified.py); `./run.sh matrix-all` runs every row
CI runs, and with --render makes the committed table from exactly those rows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from packaging.version import Version

from ep_ds_shim.releases import requirements
from ep_ds_shim.releases import support_table as table
from ep_ds_shim.releases.support import CI_RELEASE, VERIFIED_TRANSFORMERS, first_unverified, verified_range_text
from ep_ds_shim.releases.verified import MATRIX_RELEASES
from ep_ds_shim.testing import run_job, torchrun
from releases import install as install_transformers  # tools/releases.py

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "build" / "matrix"
MATRIX_JSON = REPO / "ep_ds_shim" / "releases" / "support_matrix.json"
MATRIX_MD = REPO / "docs" / "support-matrix.md"

# The declared releases, oldest to newest (one per minor; refused minors included, so the table shows the refusal).
DEFAULT_RELEASES = list(MATRIX_RELEASES)
# Model types of a row: the first two always; the third is the first of the rest with an EP plan in the release.
MODEL_TYPES = ["gpt_oss", "qwen3_moe"]
THIRD_MODEL_TYPE = ["mixtral", "olmoe", "qwen2_moe", "deepseek_v3", "llama4_text"]
# A multimodal head (ForConditionalGeneration, EP rules under `model.language_model.`), where the release has it.
MULTIMODAL = "qwen3_vl_moe"
COLUMNS = table.COLUMNS
# Columns that run no ep-ds-shim code at all: a failure there is transformers' own.
UPSTREAM_ONLY = ("forward", "gradients")

def pinned() -> dict[str, str]:
    """The versions the project's environment pins (transformers: CI's default release, from the declaration;
    wrapt, accelerate: requirements/ci.txt; DeepSpeed: run.sh's DEEPSPEED_SPEC)."""
    pins = {"transformers": CI_RELEASE}
    pins.update(re.findall(r"^(wrapt|accelerate)==(\S+)", (REPO / "requirements" / "ci.txt").read_text(), re.MULTILINE))
    pins["deepspeed"] = os.environ.get("DEEPSPEED_SPEC", "deepspeed==0.19.8").split("==")[1]
    return pins


def pip_install(spec: str, *, build: bool = False, deps: bool = False) -> None:
    """Swap one distribution in place. transformers comes with its own dependencies (releases differ: httpx,
    huggingface_hub majors), through tools/releases.py; wrapt, accelerate and DeepSpeed come alone so torch is
    never touched."""
    if spec.startswith("transformers=="):
        if install_transformers(spec.split("==")[1]):
            raise SystemExit(f"{spec}: a requirement it cannot run without is unmet (above)")
        return
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    command = [sys.executable, "-m", "pip", "install", "-q", *([] if deps else ["--no-deps"]), spec]
    if build:  # DeepSpeed: an sdist built against the installed torch, no ops ahead of time (or the wheel run.sh keeps)
        env["DS_BUILD_OPS"] = "0"
        command[-1:-1] = ["--no-build-isolation", *(f"--find-links={d}" for d in (REPO / "build" / "wheels").glob("*"))]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"pip install {spec} failed:\n{result.stdout}\n{result.stderr}")


def installed(distribution: str) -> str | None:
    """Its version in the row's environment (a fresh interpreter: pip just changed it), None when not installed."""
    out = subprocess.run([sys.executable, "-c", "import importlib.metadata as m, sys\ntry: print(m.version(sys.argv[1]))\n"
                          "except m.PackageNotFoundError: pass", distribution], capture_output=True, text=True, check=True)
    return out.stdout.strip() or None


def python(code: str, env: dict | None = None) -> str:
    env = dict(os.environ, DS_ACCELERATOR="cpu", **(env or {}))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def prepare_row(release: str, env: dict) -> tuple[list[str], dict[str, str]]:
    """In the row's environment (one interpreter): which candidate model types have an EP plan and a head, and their
    tiny checkpoints (`build_tiny_checkpoint`: the fixed preset of a text family, the shrunk default of the multimodal
    one)."""
    code = f"""
import json
from ep_ds_shim.testing import tiny_models
plans = {{t: tiny_models.has_ep_plan(t) for t in {[*MODEL_TYPES, *THIRD_MODEL_TYPE, MULTIMODAL]!r}}}
chosen = {MODEL_TYPES!r} + [next((t for t in {THIRD_MODEL_TYPE!r} if plans[t]), {THIRD_MODEL_TYPE[0]!r})]
chosen += [{MULTIMODAL!r}] if plans[{MULTIMODAL!r}] else []
paths = {{}}
for t in chosen:
    if plans[t]:
        path = {str(REPO / "build" / "ckpt" / release)!r} + "/" + t
        tiny_models.build_tiny_checkpoint(path, t)
        paths[t] = path
print(json.dumps({{"chosen": chosen, "paths": paths}}))
"""
    prepared = json.loads(python(code, env))
    return prepared["chosen"], prepared["paths"]


def run_row(release: str, *, wrapt_version: str | None, deepspeed_version: str | None,
            accelerate_version: str | None = None, unit_tests: bool = False, tests: list[str] | None = None,
            extra_env: dict | None = None) -> dict:
    started = datetime.datetime.now()

    def phase(name):
        print(f"  [{release}] {name} at {(datetime.datetime.now() - started).total_seconds():.0f}s", flush=True)

    pip_install(f"transformers=={release}", deps=True)
    phase("installed")
    if wrapt_version:
        pip_install(f"wrapt=={wrapt_version}")
    if deepspeed_version:
        pip_install(f"deepspeed=={deepspeed_version}", build=True)
    if accelerate_version:
        pip_install(f"accelerate=={accelerate_version}")
    versions = {name: installed(name) for name in ("transformers", "wrapt", "deepspeed", "torch", "accelerate")}
    kernels = installed("kernels")
    if kernels:  # transformers uses hub kernels whenever kernels is installed (5.25: on by default)
        versions["kernels"] = kernels
    # transformers' own requirements this index could not satisfy: the row runs with the switch transformers has for
    # each (e.g. USE_HUB_KERNELS=0), and its notes say what that leaves unmeasured
    unmet = requirements.unmet_requirements("transformers")
    switches = {u.switch.variable: u.switch.off for u in unmet if u.switch is not None}
    extra_env = {**(extra_env or {}), **switches}
    chosen, paths = prepare_row(release, extra_env)
    phase("checkpoints")
    row = {"release": release, "versions": versions, "models": {}, "raw": {}}
    if switches:
        row["environment"] = switches
        row["unmet"] = [f"{u.describe()}: run with {u.switch.variable}={u.switch.off}, so "
                        f"{u.requirement.name} was not measured" for u in unmet if u.switch is not None]
    for family in chosen:
        if family not in paths:
            row["models"][family] = {column: table.NO_EP_PLAN for column in COLUMNS}
    with_plan = list(paths)
    if with_plan:
        job = run_job(torchrun(2, REPO / "tools" / "matrix_worker.py", "{json}",
                               *(f"{family}={path}" for family, path in paths.items())),
                      nproc=2, cwd=REPO, timeout=1800, env=extra_env, report_dir=OUT)
        for family in with_plan:
            per_rank = [r["families"].get(family, {}) for r in job.reports]
            row["raw"][family] = per_rank
            row["models"][family] = cells(per_rank, crashed=not job.ok and len(job.reports) < 2)
        if len(job.reports) < 2:
            row["crash"] = job.output[-4000:]
        phase("worker")
    row["notes"] = row.get("unmet", []) + notes(row)
    # test suites run in the row's environment: the unit tests, and named tests (the accelerate row runs the
    # launcher tests, the only ones that go through accelerate)
    for key, paths in (("unit_tests", ["tests/unit"] if unit_tests else []), ("tests", tests or [])):
        if not paths:
            continue
        env = dict(os.environ, DS_ACCELERATOR="cpu", **(extra_env or {}))
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths],
                                cwd=REPO, env=env, capture_output=True, text=True)
        verdict = table.PASS if result.returncode == 0 else table.FAIL
        row[key] = verdict if key == "unit_tests" else {"paths": paths, "result": verdict}
        if result.returncode:
            row["notes"].append(f"{' '.join(paths)}: " + result.stdout[-1500:])
        phase(key)
    return row


def suite_failures(row: dict) -> list[str]:
    """The test suites run in the row's environment that failed."""
    failed = ["unit tests"] if row.get("unit_tests") == table.FAIL else []
    tests = row.get("tests")
    return failed + ([" ".join(tests["paths"])] if tests and tests["result"] == table.FAIL else [])


# The shim's clear refusals: of a release (UnsupportedReleaseError) and of a family's EP plan (EPRequestError)
REFUSALS = ("UnsupportedReleaseError", "EPRequestError")


# A failing column explained by an earlier one says so, in this order: (the earlier column, its cell, the columns
# whose failure it explains).
CONSEQUENCES = (
    # the shim refused the EP + ZeRO-3 load (e.g. a family whose EP plan splits dense weights): what needs it is refused
    ("load_equals_ep_only", table.REFUSED, ("zero3_step", "export_reload")),
    # a shim column that fails only because EP itself is broken upstream says so
    ("gradients", table.FAILS_UPSTREAM, ("zero3_step",)),
    # EP itself loads wrong weights: nothing after it can match
    ("forward", table.FAILS_UPSTREAM, ("load_equals_ep_only", "export_reload")),
)


def cells(per_rank: list[dict], *, crashed: bool) -> dict[str, str]:
    out = {}
    for column in COLUMNS:
        results = [rank.get(column) for rank in per_rank]
        if crashed or not results or any(r is None for r in results):
            out[column] = table.CRASHED
        elif all(r.get("ok") for r in results):
            out[column] = table.PASS
        elif all(str(r.get("error", "")).startswith(REFUSALS) for r in results):
            out[column] = table.REFUSED
        elif column in UPSTREAM_ONLY:
            out[column] = table.FAILS_UPSTREAM
        else:
            out[column] = table.FAIL
    # The release itself is refused: every column says so (the reason is in the notes).
    if out.get("shape_checks") == table.REFUSED:
        return {column: table.REFUSED for column in COLUMNS}
    for cause, cell, explained in CONSEQUENCES:
        if out.get(cause) == cell:
            for column in explained:
                if out.get(column) == table.FAIL:
                    out[column] = cell
    return out


def notes(row: dict) -> list[str]:
    """One line per distinct reason a cell is not a pass (first rank that saw it), consequences left out."""
    found, seen = [], set()
    for family, raw in row.get("raw", {}).items():
        for column in COLUMNS:
            for rank, results in enumerate(raw):
                result = results.get(column, {})
                if result.get("ok"):
                    continue
                detail = result.get("error") or {k: v for k, v in result.items() if k not in ("trace", "ok")}
                text = str(detail)
                if text.startswith("no EP") or text in seen:
                    break
                seen.add(text)
                found.append(f"{family} {column} (rank {rank}): {text[:400]}")
                break
    return found


def restore_pins() -> None:
    for name, version in pinned().items():
        if installed(name) != version:
            pip_install(f"{name}=={version}", build=name == "deepspeed", deps=name == "transformers")


def newest_release() -> str:
    """The newest transformers release on the package index."""
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "transformers"], capture_output=True,
                         text=True, env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    found = re.search(r"^transformers \(([^)]+)\)", out.stdout, re.MULTILINE)
    if not found:
        raise SystemExit(f"could not read the newest transformers from the package index:\n{out.stdout}{out.stderr}")
    return found.group(1)


def row_name(release: str, args) -> str:
    extras = (("wrapt", args.wrapt), ("deepspeed", args.deepspeed), ("torch", args.torch),
              ("accelerate", args.accelerate))
    return release + "".join(f"+{name}{version}" for name, version in extras if version)


def command_run(args) -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    releases = [newest_release()] if args.newest else (args.releases or DEFAULT_RELEASES)
    failures = 0
    try:
        for release in releases:
            unverified = Version(release) >= first_unverified()
            # a release newer than the verified range runs with the documented opt-in (the shape checks still run)
            extra_env = {"EP_DS_SHIM_ALLOW_UNVERIFIED": "1"} if unverified else {}
            name = row_name(release, args)
            done = OUT / f"{name}.json"
            if args.newest and done.exists():  # already run by this session's full matrix: reuse it
                row = json.loads(done.read_text())
            else:
                started = datetime.datetime.now()
                row = run_row(release, wrapt_version=args.wrapt, deepspeed_version=args.deepspeed,
                              accelerate_version=args.accelerate, unit_tests=args.unit_tests, tests=args.tests,
                              extra_env=extra_env)
                row["row"] = name
                row["seconds"] = round((datetime.datetime.now() - started).total_seconds(), 1)
                done.write_text(json.dumps(row, indent=1))
            summary = ", ".join(f"{m}: " + "/".join(c[0] if c == table.PASS else c for c in cols.values())
                                for m, cols in row["models"].items())
            print(f"[matrix] {name} ({row['seconds']}s): {summary}", flush=True)
            failed = [f"{m} {c}={v}" for m, cols in row["models"].items() for c, v in cols.items()
                      if v in (table.FAIL, table.CRASHED)]
            failed += suite_failures(row)
            failures += len(failed)
            if args.newest:
                verdict = "FAILS: " + ", ".join(failed) if failed else "passes every column"
                where = (f"newer than the verified range ({VERIFIED_TRANSFORMERS})" if unverified
                         else "inside the verified range")
                print(f"CANARY: transformers {release}, the newest on the package index, is {where}; its matrix "
                      f"row {verdict}.", flush=True)
    finally:
        restore_pins()
    return 1 if failures and args.strict else 0


def command_render(args) -> int:
    rows = {}
    for path in sorted(OUT.glob("*.json")):
        if path.name.startswith("worker-"):
            continue
        row = json.loads(path.read_text())
        rows[row["row"]] = {k: v for k, v in row.items() if k != "raw"}
    # --fresh: exactly the rows just run (the full re-run, `./run.sh matrix-all --render`); else merged into the table
    existing = json.loads(MATRIX_JSON.read_text()) if MATRIX_JSON.exists() and not args.fresh else {}
    merged_rows = {**existing.get("rows", {}), **rows}
    releases = {name: row for name, row in merged_rows.items() if name == row["release"]}
    matrix = {
        "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "./run.sh matrix-all --render" if args.fresh else "python tools/matrix.py run && python tools/matrix.py render",
        "verified_transformers": verified_range_text(),
        "columns": list(COLUMNS),
        "releases": releases,
        "rows": merged_rows,
    }
    MATRIX_JSON.write_text(json.dumps(matrix, indent=1, sort_keys=True) + "\n")
    MATRIX_MD.parent.mkdir(exist_ok=True)
    MATRIX_MD.write_text(markdown(matrix))
    print(f"rendered {len(merged_rows)} rows into {MATRIX_JSON.relative_to(REPO)} and {MATRIX_MD.relative_to(REPO)}")
    return 0


def command_verdict(args) -> int:
    """Exit 1 unless the rows just run for `args.releases` exist and fail no column (what add-release requires
    before it moves the declared range)."""
    status = 0
    for release in args.releases:
        path = OUT / f"{release}.json"
        if not path.exists():
            print(f"{release}: no row in {OUT.relative_to(REPO)} (run it first)")
            status = 1
            continue
        row = json.loads(path.read_text())
        failed = [f"{m} {c}={v}" for m, cols in row["models"].items() for c, v in cols.items()
                  if v in (table.FAIL, table.CRASHED)] + suite_failures(row)
        if failed:
            status = 1
            print(f"{release}: FAILS {', '.join(failed)}")
            for note in row.get("notes", []):
                print(f"  - {note}")
            if row.get("crash"):
                print(row["crash"][-2000:])
        else:
            print(f"{release}: no column fails")
    return status


def command_recell(args) -> int:
    """Recompute the cells and notes of rows in build/matrix from their raw results (after changing them)."""
    for path in sorted(OUT.glob("*.json")):
        if path.name.startswith("worker-"):
            continue
        row = json.loads(path.read_text())
        for family, raw in row.get("raw", {}).items():
            row["models"][family] = cells(raw, crashed=len(raw) < 2)
        unit_notes = [n for n in row.get("notes", []) if n.startswith("unit tests:")]
        row["notes"] = row.get("unmet", []) + notes(row) + unit_notes
        path.write_text(json.dumps(row, indent=1))
    return 0


def command_check(args) -> int:
    """Compare the rows just run (build/matrix) with the committed table, cell by cell."""
    committed = json.loads(MATRIX_JSON.read_text()).get("rows", {}) if MATRIX_JSON.exists() else {}
    fresh = {}
    for path in sorted(OUT.glob("*.json")):
        if not path.name.startswith("worker-"):
            row = json.loads(path.read_text())
            fresh[row["row"]] = row
    if not fresh:
        print("no fresh rows in build/matrix: run `python tools/matrix.py run ...` first")
        return 1
    problems = []
    for name, row in fresh.items():
        if name not in committed:
            if args.newest and Version(row["release"]) >= first_unverified():
                print(f"{name}: newer than the committed table; the CANARY line above is its verdict")
                continue
            problems.append(f"{name}: not in the committed table (run `python tools/matrix.py render` and commit)")
            continue
        for model, cells_ in row["models"].items():
            want = committed[name]["models"].get(model)
            if want != cells_:
                problems.append(f"{name} {model}: committed {want}, measured now {cells_}")
        for suite in ("unit_tests", "tests"):
            if row.get(suite) != committed[name].get(suite):
                problems.append(f"{name} {suite}: committed {committed[name].get(suite)}, now {row.get(suite)}")
    for problem in problems:
        print("MISMATCH", problem)
    print(f"checked {len(fresh)} rows against {MATRIX_JSON.relative_to(REPO)}: "
          f"{'OK' if not problems else f'{len(problems)} mismatches'}")
    return 1 if problems else 0


def _version_key(name: str):
    base = name.split("+")[0]
    return tuple(int(x) for x in base.split(".")), name


def markdown(matrix: dict) -> str:
    lines = [
        "# Support matrix",
        "",
        "Generated by `tools/matrix.py` from real runs (2 gloo ranks, CPU, fp32, tolerance 1e-5); do not edit by hand.",
        f"Last generated: {matrix['generated']}. Reproduce one row: `./run.sh matrix <release>`; every row:",
        "`./run.sh matrix-all` (`--render` makes this table from exactly those rows); CI runs each release line's",
        "oldest and newest row and the extra rows (`./run.sh matrix-ci`).",
        "",
        f"Verified transformers releases: `{matrix.get('verified_transformers', verified_range_text())}`, declared once in",
        "`ep_ds_shim/releases/verified.py` (pyproject.toml states the same range; `./run.sh add-release X.Y.Z` moves it).",
        "",
        "Columns: **shape** the shim's checks of every patched target; **load = EP-only** an EP load under ZeRO-3 inside",
        "the block equals the EP-only load weight for weight and in logits; **forward** EP-only logits equal the",
        "single-process model; **gradients** EP-only loss and every gradient equal it (no DeepSpeed: transformers' own",
        "EP); **ZeRO-3 step** `ep_ds_shim.initialize` + one step, every rank on its own batch: logits, loss,",
        "gradients, gradient norm and weights after AdamW equal a single-process step on all ranks' batches together;",
        "**export + reload** `ep_ds_shim.save_pretrained` of the trained engine (where training is",
        "refused: of the model as loaded), reloaded in a plain single process with no missing, unexpected or",
        "mismatched keys, every weight equal to the single-process model. *fails upstream* = transformers' EP is wrong",
        "there without this library; *refused* = the library raises a clear error instead (the reason is in the notes).",
        "",
        "| row | model | shape | load = EP-only | forward | gradients | ZeRO-3 step | export + reload |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted(matrix["rows"], key=_version_key):
        row = matrix["rows"][name]
        for model, cells_ in sorted(row["models"].items()):  # the same order whichever run wrote the row
            lines.append(f"| {name} | {model} | " + " | ".join(cells_.get(c, "not run") for c in COLUMNS) + " |")
    lines += ["", "## Notes", ""]
    for name in sorted(matrix["rows"], key=_version_key):
        row = matrix["rows"][name]
        versions = ", ".join(f"{k} {v}" for k, v in row.get("versions", {}).items())
        unit = f"; unit tests {row['unit_tests']}" if "unit_tests" in row else ""
        if "tests" in row:
            unit += f"; {' '.join(row['tests']['paths'])} {row['tests']['result']}"
        environment = "".join(f"; {k}={v}" for k, v in row.get("environment", {}).items())
        lines.append(f"- **{name}** ({versions}{environment}; {row.get('seconds', '?')} s{unit})")
        for note in row.get("notes", []):
            lines.append(f"  - {note}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("releases", nargs="*")
    run.add_argument("--wrapt", help="also swap wrapt to this version for these rows")
    run.add_argument("--deepspeed", help="also swap DeepSpeed to this version for these rows")
    run.add_argument("--accelerate", help="also swap accelerate to this version for these rows")
    run.add_argument("--strict", action="store_true", help="exit 1 if a shim column fails")
    run.add_argument("--unit-tests", action="store_true", help="also run tests/unit under these versions")
    run.add_argument("--tests", action="append", help="also run these tests (pytest paths) under these versions")
    run.add_argument("--newest", action="store_true", help="the canary: the newest transformers on the package index")
    run.add_argument("--torch", help="label of a row run in an environment with this torch (./run.sh builds it)")
    render = sub.add_parser("render")
    render.add_argument("--fresh", action="store_true", help="only the rows in build/matrix, not merged into the table")
    verdict = sub.add_parser("verdict", help="exit 1 unless these rows in build/matrix fail no column")
    verdict.add_argument("releases", nargs="+")
    check = sub.add_parser("check", help="compare rows in build/matrix with the committed table; exit 1 on mismatch")
    check.add_argument("releases", nargs="*")  # the run's arguments, passed through by ./run.sh
    check.add_argument("--newest", action="store_true", help="a canary row newer than the table is information only")
    for option in ("--wrapt", "--deepspeed", "--torch", "--accelerate"):
        check.add_argument(option)
    check.add_argument("--unit-tests", action="store_true")
    check.add_argument("--tests", action="append")
    check.add_argument("--strict", action="store_true")
    sub.add_parser("recell", help="recompute cells of rows in build/matrix from their raw results")
    args = parser.parse_args(argv)
    commands = {"run": command_run, "render": command_render, "check": command_check, "recell": command_recell,
                "verdict": command_verdict}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
