"""transformers' own EP test cases (tests/test_expert_parallel_mixin.py of the installed release's sdist:
test_ep_forward x 6, test_ep_backward x 3, for qwen3_moe, olmoe and qwen2_moe: 27 cases), with the EP load in
upstream's own spelling under a live ZeRO-3 config inside `ep_zero3_compat`.

- `DistributedConfig(tp_size=N, ep_size=N)` loads as the library's EP request (dense layers whole): every forward case
  passes as upstream wrote it; every backward case passes with upstream's comparison, where each expert weight's
  reference is world x the single-process gradient: a model loaded while DeepSpeed is signalled routes every rank's
  own tokens (DeepSpeed then averages over the world), and upstream's cases feed the same batch to every rank.
- The legacy `DistributedConfig(enable_expert_parallel=True)` (PR #45548's recipe) too.
- With `translate_upstream_spelling=False` every case is refused before any weight is read, naming the fix.

The sdist comes from the package index with pip (`pip download --no-binary :all: --no-deps`), cached under build/.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ep_ds_shim.releases.support import transformers_version
from ep_ds_shim.testing import run_job, torchrun

REPO = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("worker_upstream_ep.py")
FAMILIES = ("qwen3_moe", "olmoe", "qwen2_moe")
FILES = ("test_expert_parallel_mixin.py", "test_tensor_parallel_mixin.py")


@pytest.fixture(scope="module")
def upstream_tests() -> Path:
    version = transformers_version()
    root = REPO / "build" / "upstream-sdist" / version
    tests = root / "tests"
    if not all((tests / name).exists() for name in FILES):
        root.mkdir(parents=True, exist_ok=True)
        download = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                                   f"transformers=={version}", "-d", str(root)], capture_output=True, text=True)
        assert download.returncode == 0, download.stderr
        [archive] = root.glob("transformers-*.tar.gz")
        tests.mkdir(exist_ok=True)
        with tarfile.open(archive) as sdist:
            for member in sdist.getmembers():
                if member.name.endswith(tuple(f"/tests/{name}" for name in FILES)):
                    (tests / Path(member.name).name).write_bytes(sdist.extractfile(member).read())
    if not (tests / FILES[0]).exists():
        pytest.skip(f"the transformers {version} sdist has no {FILES[0]}")
    return tests


def _run(upstream_tests, tmp_path, env, families=FAMILIES):
    run = run_job(torchrun(2, WORKER, upstream_tests, tmp_path / "work", "{json}", *families), nproc=2,
                  cwd=REPO, env=env, timeout=2400, report_dir=tmp_path)
    assert run.returncode == 0 and len(run.reports) == 2, run
    return run


@pytest.mark.distributed
@pytest.mark.parametrize("spelling", ["canonical", "legacy"])
def test_upstream_ep_cases_pass_under_zero3_inside_the_block(spelling, upstream_tests, tmp_path):
    run = _run(upstream_tests, tmp_path, {"PER_RANK_BATCHES": "1", "SPELLING": spelling})
    for report in run.reports:
        results = report["results"]
        assert len(results) == 9 * len(FAMILIES), results
        failed = {name: outcome for name, outcome in results.items() if outcome != "passed"}
        assert not failed, json.dumps(failed, indent=1)
    if spelling == "canonical":
        # the log line: once per model class and job, on the first rank
        assert run.output.count("loading it as expert parallelism only") == len(FAMILIES), run.output[-3000:]


@pytest.mark.distributed
def test_upstream_spelling_is_refused_before_any_weight_is_read_without_translation(upstream_tests, tmp_path):
    run = _run(upstream_tests, tmp_path, {"TRANSLATE": "0"}, families=("qwen3_moe",))
    for report in run.reports:
        for name, outcome in report["results"].items():
            assert outcome.startswith("EPRequestError: ") and "splits the dense layers" in outcome, (name, outcome)
            assert "ep_ds_shim.ep_from_pretrained_kwargs(path, ep_size=2)" in outcome
    assert "Loading weights" not in run.output  # refused before the load read anything
