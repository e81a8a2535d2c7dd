"""The support matrix: run every column of every row on real releases, and render the committed table.

    python tools/matrix.py run [RELEASE ...]       # default: the last patch of every verified minor
    python tools/matrix.py run 5.20.2 --wrapt 1.17.3 --deepspeed 0.19.0
    python tools/matrix.py run --newest            # the canary: the newest transformers on the package index
    python tools/matrix.py render                  # build/matrix/*.json -> ep_ds_shim/releases/support_matrix.json,
                                                   #                        docs/support-matrix.md
    python tools/matrix.py check                   # rows just run == the committed table (CI)
    ./run.sh matrix 5.20.2                         # one release in the matrix environment, then checked

`run` swaps transformers (and optionally wrapt / DeepSpeed) inside the environment it runs in (./run.sh gives it
build/venvs/matrix, never the project's .venv) with pip, builds tiny checkpoints with that release, runs
tools/matrix_worker.py over 2 gloo ranks, writes build/matrix/<row>.json, and puts the pinned versions back.
A row on another torch (`--torch X`) is run by ./run.sh in an environment built with that torch.
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

from ep_ds_shim.releases import support_table as table
from ep_ds_shim.releases.support import VERIFIED_TRANSFORMERS, first_unverified
from ep_ds_shim.testing import run_job, torchrun

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "build" / "matrix"
MATRIX_JSON = REPO / "ep_ds_shim" / "releases" / "support_matrix.json"
MATRIX_MD = REPO / "docs" / "support-matrix.md"

# Oldest verified to newest published: the last patch of every minor (5.23 has one release so far).
DEFAULT_RELEASES = [
    "5.6.2", "5.7.0", "5.8.1", "5.9.0", "5.10.4", "5.11.0", "5.12.1", "5.13.1", "5.14.1", "5.15.1", "5.16.1",
    "5.17.0", "5.18.0", "5.19.0", "5.20.2", "5.21.1", "5.22.2", "5.23.0", "5.24.0",
]
# Model types of a row: the first two always; the third is the first of the rest with an EP plan in the release.
MODEL_TYPES = ["gpt_oss", "qwen3_moe"]
THIRD_MODEL_TYPE = ["mixtral", "olmoe", "qwen2_moe", "deepseek_v3", "llama4_text"]
# A multimodal head (ForConditionalGeneration, EP rules under `model.language_model.`), where the release has it.
MULTIMODAL = "qwen3_vl_moe"
COLUMNS = table.COLUMNS
# Columns that run no ep-ds-shim code at all: a failure there is transformers' own.
UPSTREAM_ONLY = ("forward", "gradients")

def pinned() -> dict[str, str]:
    """The versions the project's environment pins (requirements/ci.txt; DeepSpeed: run.sh's DEEPSPEED_SPEC)."""
    pins = dict(re.findall(r"^(transformers|wrapt)==(\S+)", (REPO / "requirements" / "ci.txt").read_text(), re.MULTILINE))
    pins["deepspeed"] = os.environ.get("DEEPSPEED_SPEC", "deepspeed==0.19.8").split("==")[1]
    return pins


def pip_install(spec: str, *, build: bool = False, deps: bool = False) -> None:
    """Swap one distribution in place. transformers comes with its own dependencies (releases differ: httpx,
    huggingface_hub majors); wrapt and DeepSpeed come alone so torch is never touched."""
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    command = [sys.executable, "-m", "pip", "install", "-q", *([] if deps else ["--no-deps"]), spec]
    if build:  # DeepSpeed: an sdist built against the installed torch, no ops ahead of time (or the wheel run.sh keeps)
        env["DS_BUILD_OPS"] = "0"
        command[-1:-1] = ["--no-build-isolation", *(f"--find-links={d}" for d in (REPO / "build" / "wheels").glob("*"))]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"pip install {spec} failed:\n{result.stdout}\n{result.stderr}")


def installed(distribution: str) -> str:
    out = subprocess.run([sys.executable, "-c", f"import importlib.metadata as m; print(m.version('{distribution}'))"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def python(code: str) -> str:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def prepare_row(release: str) -> tuple[list[str], dict[str, str]]:
    """In the row's environment (one interpreter): which candidate model types have an EP plan and a head, and their
    tiny checkpoints (the fixed ones of the text families; the generic tiny model of the multimodal one)."""
    code = f"""
import json
from ep_ds_shim.testing import build_tiny_moe, tiny_models
plans = {{t: tiny_models.has_ep_plan(t) for t in {[*MODEL_TYPES, *THIRD_MODEL_TYPE, MULTIMODAL]!r}}}
chosen = {MODEL_TYPES!r} + [next((t for t in {THIRD_MODEL_TYPE!r} if plans[t]), {THIRD_MODEL_TYPE[0]!r})]
chosen += [{MULTIMODAL!r}] if plans[{MULTIMODAL!r}] else []
paths = {{}}
for t in chosen:
    if plans[t]:
        path = {str(REPO / "build" / "ckpt" / release)!r} + "/" + t
        (tiny_models.build_tiny_model if t == {MULTIMODAL!r} else build_tiny_moe)(path, t)
        paths[t] = path
print(json.dumps({{"chosen": chosen, "paths": paths}}))
"""
    prepared = json.loads(python(code))
    return prepared["chosen"], prepared["paths"]


def run_row(release: str, *, wrapt_version: str | None, deepspeed_version: str | None, unit_tests: bool = False,
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
    versions = {name: installed(name) for name in ("transformers", "wrapt", "deepspeed", "torch", "accelerate")}
    chosen, paths = prepare_row(release)
    phase("checkpoints")
    row = {"release": release, "versions": versions, "models": {}, "raw": {}}
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
    row["notes"] = notes(row)
    if unit_tests:
        env = dict(os.environ, DS_ACCELERATOR="cpu", **(extra_env or {}))
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "unit")],
                                cwd=REPO, env=env, capture_output=True, text=True)
        row["unit_tests"] = table.PASS if result.returncode == 0 else table.FAIL
        if result.returncode:
            row["notes"].append("unit tests: " + result.stdout[-1500:])
    return row


def cells(per_rank: list[dict], *, crashed: bool) -> dict[str, str]:
    out = {}
    for column in COLUMNS:
        results = [rank.get(column) for rank in per_rank]
        if crashed or not results or any(r is None for r in results):
            out[column] = table.CRASHED
        elif all(r.get("ok") for r in results):
            out[column] = table.PASS
        elif all(str(r.get("error", "")).startswith("UnsupportedReleaseError") for r in results):
            out[column] = table.REFUSED
        elif column in UPSTREAM_ONLY:
            out[column] = table.FAILS_UPSTREAM
        else:
            out[column] = table.FAIL
    # The release itself is refused: every column says so (the reason is in the notes).
    if out.get("shape_checks") == table.REFUSED:
        return {column: table.REFUSED for column in COLUMNS}
    # A shim column that fails only because EP itself is broken upstream says so.
    if out.get("gradients") == table.FAILS_UPSTREAM and out.get("zero3_step") == table.FAIL:
        out["zero3_step"] = table.FAILS_UPSTREAM
    if out.get("forward") == table.FAILS_UPSTREAM:  # EP itself loads wrong weights: nothing after it can match
        for column in ("load_equals_ep_only", "export_reload"):
            if out.get(column) == table.FAIL:
                out[column] = table.FAILS_UPSTREAM
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
    extras = (("wrapt", args.wrapt), ("deepspeed", args.deepspeed), ("torch", args.torch))
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
                              unit_tests=args.unit_tests, extra_env=extra_env)
                row["row"] = name
                row["seconds"] = round((datetime.datetime.now() - started).total_seconds(), 1)
                done.write_text(json.dumps(row, indent=1))
            summary = ", ".join(f"{m}: " + "/".join(c[0] if c == table.PASS else c for c in cols.values())
                                for m, cols in row["models"].items())
            print(f"[matrix] {name} ({row['seconds']}s): {summary}", flush=True)
            failed = [f"{m} {c}={v}" for m, cols in row["models"].items() for c, v in cols.items()
                      if v in (table.FAIL, table.CRASHED)]
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
    existing = json.loads(MATRIX_JSON.read_text()) if MATRIX_JSON.exists() else {"releases": {}, "rows": {}}
    merged_rows = {**existing.get("rows", {}), **rows}
    releases = {name: row for name, row in merged_rows.items() if name == row["release"]}
    matrix = {
        "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python tools/matrix.py run && python tools/matrix.py render",
        "columns": list(COLUMNS),
        "releases": releases,
        "rows": merged_rows,
    }
    MATRIX_JSON.write_text(json.dumps(matrix, indent=1, sort_keys=True) + "\n")
    MATRIX_MD.parent.mkdir(exist_ok=True)
    MATRIX_MD.write_text(markdown(matrix))
    print(f"rendered {len(merged_rows)} rows into {MATRIX_JSON.relative_to(REPO)} and {MATRIX_MD.relative_to(REPO)}")
    return 0


def command_recell(args) -> int:
    """Recompute the cells and notes of rows in build/matrix from their raw results (after changing them)."""
    for path in sorted(OUT.glob("*.json")):
        if path.name.startswith("worker-"):
            continue
        row = json.loads(path.read_text())
        for family, raw in row.get("raw", {}).items():
            row["models"][family] = cells(raw, crashed=len(raw) < 2)
        unit_notes = [n for n in row.get("notes", []) if n.startswith("unit tests:")]
        row["notes"] = notes(row) + unit_notes
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
        if row.get("unit_tests") != committed[name].get("unit_tests"):
            problems.append(f"{name} unit tests: committed {committed[name].get('unit_tests')}, now {row.get('unit_tests')}")
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
        f"Last generated: {matrix['generated']}. Reproduce one row: `./run.sh matrix <release>`.",
        "",
        "Columns: **shape** the shim's checks of every patched target; **load = EP-only** an EP load under ZeRO-3 inside",
        "the block equals the EP-only load weight for weight and in logits; **forward** EP-only logits equal the",
        "single-process model; **gradients** EP-only loss and every gradient equal it (no DeepSpeed: transformers' own",
        "EP); **ZeRO-3 step** `ep_ds_shim.initialize` + one step: logits, loss, gradients, gradient norm and weights",
        "after AdamW equal it; **export + reload** `ep_ds_shim.save_pretrained` of the trained engine (where training is",
        "refused: of the model as loaded), reloaded in a plain single process with no missing, unexpected or",
        "mismatched keys, every weight equal to the single-process model. *fails upstream* = transformers' EP is wrong",
        "there without this library; *refused* = the library raises a clear error instead (the reason is in the notes).",
        "",
        "| row | model | shape | load = EP-only | forward | gradients | ZeRO-3 step | export + reload |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted(matrix["rows"], key=_version_key):
        row = matrix["rows"][name]
        for model, cells_ in row["models"].items():
            lines.append(f"| {name} | {model} | " + " | ".join(cells_.get(c, "not run") for c in COLUMNS) + " |")
    lines += ["", "## Notes", ""]
    for name in sorted(matrix["rows"], key=_version_key):
        row = matrix["rows"][name]
        versions = ", ".join(f"{k} {v}" for k, v in row.get("versions", {}).items())
        unit = f"; unit tests {row['unit_tests']}" if "unit_tests" in row else ""
        lines.append(f"- **{name}** ({versions}; {row.get('seconds', '?')} s{unit})")
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
    run.add_argument("--strict", action="store_true", help="exit 1 if a shim column fails")
    run.add_argument("--unit-tests", action="store_true", help="also run tests/unit under these versions")
    run.add_argument("--newest", action="store_true", help="the canary: the newest transformers on the package index")
    run.add_argument("--torch", help="label of a row run in an environment with this torch (./run.sh builds it)")
    sub.add_parser("render")
    check = sub.add_parser("check", help="compare rows in build/matrix with the committed table; exit 1 on mismatch")
    check.add_argument("releases", nargs="*")  # the run's arguments, passed through by ./run.sh
    check.add_argument("--newest", action="store_true", help="a canary row newer than the table is information only")
    for option in ("--wrapt", "--deepspeed", "--torch"):
        check.add_argument(option)
    check.add_argument("--unit-tests", action="store_true")
    check.add_argument("--strict", action="store_true")
    sub.add_parser("recell", help="recompute cells of rows in build/matrix from their raw results")
    args = parser.parse_args(argv)
    commands = {"run": command_run, "render": command_render, "check": command_check, "recell": command_recell}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
