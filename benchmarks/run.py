"""Benchmarks: ep-ds-shim against DeepSpeed AutoEP, at a realistic size, with targets the run decides itself.

    ./run.sh bench             # = python benchmarks/run.py: the full run (about 25 minutes on an idle 2-core machine)
    ./run.sh bench --quick     # small checkpoints only (a few minutes)
    python benchmarks/run.py --sections compare,ratio --max-minutes 20

Everything runs in fresh gloo jobs on this machine's CPU; every figure is a ratio between variants measured in
the same run, or an absolute figure with the spread of its repeats. Tables (printed, written to
benchmarks/results.md with the command and date, and to build/bench/results.json):

1. shim vs AutoEP on the same checkpoint, ranks and global batches (each shim rank trains on its own slice, as
   AutoEP's "split" side does): DeepSpeed AutoEP (0.19.8) fails inside `deepspeed.initialize` on transformers
   5.23+, so both sides run on transformers 5.22.2, in an environment of their own (build/venvs/bench-autoep, made
   once like run.sh makes one). Loss after one and after several steps against a single-process model; load time;
   peak RSS per rank; deepspeed.initialize; first step; steady-state step; as shim/AutoEP ratios per round (rounds
   alternate which side runs first). The AutoEP failure on the main environment's release is re-measured in the
   same run.
1b. ZeRO-3 sharding under EP at ep = world (section "shard"): this checkout against ep-ds-shim 0.2.0 (commit
   04aa7ff, in an environment of its own, build/venvs/bench-baseline-0.2.0: DeepSpeed got the layout's mpu, every
   rank of an EP group trained on the same batch) and AutoEP with the batch split over ranks, on the same global
   batch per step: the dense parameters each rank holds (`ds_tensor.numel()` / `ds_numel`, target within 10% of
   1/world), the optimizer state, peak RSS, and the steady-state step (target: no slower than AutoEP split).
   Large training jobs wait for enough free memory (--memory-wait) and are skipped, and say so, if it never comes.
2. realistic size (>= 1.5 GB, 64 experts per layer), 2 and 4 ranks: per rank load time, peak RSS against the
   bytes the rank must hold, the integrity fingerprints and `verify_expert_integrity` as % of load time.
3. cost growth over experts (64 vs 128 per layer, same expert size) x ranks (2 vs 4).
5. the export (`ep_ds_shim.save_pretrained`, streamed, every rank writes) against the previous one (the whole
   model gathered to global rank 0 and written there), max_shard_size = 1/8 of the model, 1.5 GB and 3 GB on 2
   and 4 ranks: time, each rank's peak RSS growth against max_shard_size + the largest tensor, the stream's own
   steps, and whether both exports hold identical tensors.
4. the shim's load against the EP-only load (target <= 1.05), decided by the run: both variants alternate
   (ABBA) inside the same processes, each load after the checkpoint was read into the page cache (same cache
   state for every load) and the heap returned to the OS; jobs alternate which variant comes first; pairs are
   added until the 95% confidence interval of the median ratio is narrower than --precision or the time budget
   is spent. Cross-check: the shim's own time, timed directly around its wrappers and post-load work.
6. checkpoints (section "resume"): save_checkpoint on 2 ranks (ep=2), the resume in the same layout (DeepSpeed's own
   load: the baseline) and on 4 ranks (dp=2 x ep=2: the conversion to DeepSpeed's universal format, timed on its
   own, then the universal load): seconds, peak RSS per rank and bytes on disk, over model sizes.

Checkpoints (qwen3_moe, built locally with ep_ds_shim.testing.build_tiny_moe) are built once under build/bench and
reused while their stamp matches. `BENCH_PROFILE=out.prof` in a worker's environment profiles its rank 0
(cProfile); `BENCH_PROFILE_STEPS=out.prof` its steady-state training steps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = REPO / "build" / "bench"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import common  # noqa: E402
import envs  # noqa: E402
import render  # noqa: E402

# Checkpoints: fp32, untied embeddings; vocab 1024, top-2 routing; qwen3_moe unless named otherwise.
SIZES = {
    "mixtral-small-64": dict(num_experts=64, hidden_size=128, num_layers=2, expert_size=64),
    "small-64": dict(num_experts=64, hidden_size=128, num_layers=2, expert_size=64),
    "small-128": dict(num_experts=128, hidden_size=128, num_layers=2, expert_size=64),
    "medium-64": dict(num_experts=64, hidden_size=256, num_layers=4, expert_size=128),
    "large-64": dict(num_experts=64, hidden_size=768, num_layers=8, expert_size=336),
    "large-128": dict(num_experts=128, hidden_size=768, num_layers=8, expert_size=336),
}
COMMON_SIZES = dict(vocab_size=1024, top_k=2)

PLANS = {
    "quick": {
        # (checkpoint, steps, rounds, AutoEP's variants as load[:batch]: every one in the first round, the first after)
        "compare": [("small-64", 6, 2, "plain:split,plain"), ("mixtral-small-64", 6, 1, "plain:split")],
        "growth": {"sizes": ("small-64", "small-128"), "ranks": (2, 4)},
        "export": {"sizes": ("small-64", "small-128"), "ranks": (2, 4)},
        "ratio": "small-64",
        "ratio_jobs": 3,
        # (checkpoint, ranks, steps, rounds): every side in every round, rounds alternating the order
        "shard": [("small-64", 2, 6, 2), ("small-64", 4, 3, 1)],
        "resume": ("small-64", "medium-64"),
        "minutes": 10.0,
    },
    "full": {
        "compare": [("medium-64", 12, 3, "plain:split,plain"), ("mixtral-small-64", 6, 1, "plain:split"),
                    ("large-64", 3, 2, "plain:split,plain")],
        "growth": {"sizes": ("large-64", "large-128"), "ranks": (2, 4)},
        "export": {"sizes": ("large-64", "large-128"), "ranks": (2, 4)},
        "ratio": "large-64",
        "ratio_jobs": 12,
        "shard": [("large-64", 2, 5, 2), ("medium-64", 4, 4, 1)],
        "resume": ("medium-64", "large-64"),
        "minutes": 25.0,
    },
}
SECTIONS = ("overhead", "compare", "shard", "growth", "export", "resume", "profile", "ratio")
# The shard section's global batch: sequences per optimizer step, the same for every side (split over 2 or 4 ranks).
SHARD_SEQUENCES = 4
# Its sides: (name, batch mode); which python runs them is in Bench.shard_side.
SHARD_SIDES = (("shim", "split"), ("shim-0.2.0", "same"), ("autoep-plain-split", "split"))


def family_of(size: str) -> str:
    return "mixtral" if size.startswith("mixtral") else "qwen3_moe"


class Bench:
    def __init__(self, args):
        self.args = args
        self.plan = PLANS["quick" if args.quick else "full"]
        self.started = time.monotonic()
        self.deadline = self.started + 60 * (args.max_minutes or self.plan["minutes"])
        self.logs = OUT / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.main_python = sys.executable
        self.results: dict = {"sections": {}}

    # --- infrastructure -----------------------------------------------------------------------------------------

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.0f}s] {message}", flush=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def checkpoint(self, name: str) -> Path:
        """Build (once) the named checkpoint with the main environment's transformers; reuse it while its stamp
        (sizes, seed) matches: every transformers 5.x release loads it, so both environments share it."""
        sizes = {**SIZES[name], **COMMON_SIZES}
        family = family_of(name)
        path = OUT / (name if name.startswith(family) else f"{family}-{name}")
        stamp = path / "bench_stamp.json"
        want = {"model_type": family, "seed": 0, **sizes}
        if stamp.exists() and json.loads(stamp.read_text()).get("sizes") == want and common.checkpoint_files(path):
            return path
        self.log(f"building checkpoint {path.relative_to(REPO)} ({sizes}); once")
        if path.exists():
            shutil.rmtree(path)
        code = ("import json, sys, transformers\nfrom ep_ds_shim.testing import build_tiny_moe\n"
                f"build_tiny_moe({str(path)!r}, {family!r}, **{sizes!r})\n")
        subprocess.run([self.main_python, "-c", code], check=True, env=self.env(), capture_output=True)
        import transformers

        stamp.write_text(json.dumps({"sizes": want, "built_with_transformers": transformers.__version__}))
        return path

    def env(self, autoep_env: bool = False, baseline_env: bool = False) -> dict:
        env = {"PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false",
               "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions"))}
        if autoep_env:
            env.update(envs.autoep_env_vars())
        if baseline_env:
            env.update(envs.baseline_env_vars())
        return {**os.environ, **env}

    def job(self, name: str, python, script: str, args: list, nproc: int, *, autoep_env=False, baseline_env=False,
            allow_fail=False, timeout: float = 1800) -> tuple[int, list[dict]]:
        """One fresh torchrun job; returns (exit status, every rank's report sorted by rank)."""
        from ep_ds_shim.testing import run_job

        argv = [str(python), "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                "--master_port={port}", str(HERE / script), *map(str, args)]
        started = time.monotonic()
        result = run_job(argv, nproc=nproc, env=self.env(autoep_env, baseline_env), timeout=timeout, report_dir=OUT)
        (self.logs / f"{name}.log").write_text(" ".join(shlex.quote(a) for a in argv) + "\n" + result.output)
        reports = sorted(result.reports, key=lambda r: r["rank"])
        self.log(f"  {name}: {time.monotonic() - started:.0f}s wall, exit {result.returncode}")
        if not allow_fail and (result.returncode != 0 or len(reports) != nproc):
            raise RuntimeError(f"benchmark job {name} failed (log: {self.logs / f'{name}.log'}):\n"
                               f"{result.output[-4000:]}")
        return result.returncode, reports

    # --- sections -----------------------------------------------------------------------------------------------

    def overhead(self) -> dict:
        """In process: entering/leaving the block, and a wrapped function called outside any block."""
        code = """
import json, threading, timeit
import transformers.modeling_utils as modeling_utils
import ep_ds_shim
original = modeling_utils.is_deepspeed_zero3_enabled
with ep_ds_shim.ep_zero3_compat():
    pass  # the first entry pays one-time imports; measure installing and the steady state below
hold, held = threading.Event(), threading.Event()
def holder():
    with ep_ds_shim.ep_zero3_compat():  # keeps the wrappers installed while this thread is outside the block
        held.set(); hold.wait()
enter_exit_cold = timeit.timeit(lambda: ep_ds_shim.ep_zero3_compat().__enter__().__exit__(None, None, None), number=20) / 20
thread = threading.Thread(target=holder); thread.start(); held.wait()
enter_exit_warm = min(timeit.repeat(lambda: ep_ds_shim.ep_zero3_compat().__enter__().__exit__(None, None, None), number=2000, repeat=5)) / 2000
wrapped = modeling_utils.is_deepspeed_zero3_enabled
assert wrapped is not original
n = 200000
unwrapped_ns = min(timeit.repeat(original, number=n, repeat=5)) / n * 1e9
wrapped_ns = min(timeit.repeat(wrapped, number=n, repeat=5)) / n * 1e9
hold.set(); thread.join()
print(json.dumps(dict(enter_exit_install_us=enter_exit_cold * 1e6, enter_exit_installed_us=enter_exit_warm * 1e6,
                      unwrapped_call_ns=unwrapped_ns, wrapped_call_outside_block_ns=wrapped_ns)))
"""
        out = subprocess.run([self.main_python, "-c", code], capture_output=True, text=True, env=self.env(),
                             check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    def compare(self) -> dict:
        """Table 1: the shim's path and AutoEP on the same checkpoint, ranks and batches (transformers 5.22.2)."""
        autoep_python = envs.ensure_autoep_env(log=self.log)
        out = {"transformers": envs.AUTOEP_TRANSFORMERS, "runs": {}}
        # AutoEP on the main environment's release, as a user there gets it (expected to fail on 5.23+)
        out["main_env_autoep"] = {}
        for size in ("small-64", "mixtral-small-64"):
            family = family_of(size)
            rc, reports = self.job(f"autoep-main-env-{family}", self.main_python, "autoep_worker.py",
                                   [self.checkpoint(size), "{json}", "--steps", "1", "--family", family], 2,
                                   allow_fail=True, timeout=600)
            out["main_env_autoep"][family] = {"returncode": rc, "reports": reports}
        for size, steps, rounds, loads in self.plan["compare"]:
            if size.startswith("large") and self.left() < 60 * (6.5 if not self.args.quick else 1):
                self.log(f"compare {size}: skipped, not enough time left in the budget ({self.left():.0f}s)")
                continue
            path = self.checkpoint(size)
            self.log(f"compare on {path.name} ({steps} steps, {rounds} round(s)): reference")
            reference = OUT / f"reference-{size}-{steps}.json"
            subprocess.run([str(autoep_python), str(HERE / "reference.py"), str(path), str(reference), "--steps",
                            str(steps)], check=True, env=self.env(True), capture_output=True)
            family = family_of(size)
            run = {"checkpoint": path.name, "family": family, "bytes": common.checkpoint_bytes(path), "steps": steps,
                   "reference": json.loads(reference.read_text()), "rounds": []}
            for index in range(rounds):
                variants = (self.args.autoep_variants or loads).split(",")
                sides = ["shim", *(f"autoep-{v.replace(':', '-')}" for v in variants)]
                sides = sides if index == 0 or rounds > 2 else sides[:2]
                order = sides if index % 2 == 0 else sides[::-1]
                round_ = {"order": list(order)}
                for side in order:
                    if not self.wait_for_memory(common.training_memory_mb(run["bytes"], 2),
                                                f"compare-{size}-r{index}-{side}"):
                        round_[side] = []
                        continue
                    if side == "shim":
                        _, round_["shim"] = self.job(f"compare-{size}-r{index}-shim", autoep_python, "bench_worker.py",
                                                     ["train", path, "{json}", "--steps", steps], 2, autoep_env=True)
                    else:
                        _, round_[side] = self.job(f"compare-{size}-r{index}-{side}", autoep_python,
                                                   "autoep_worker.py", [path, "{json}", "--steps", steps,
                                                                        "--family", family,
                                                                        "--load", side.split("-")[1],
                                                                        "--batch", (side.split("-") + ["same"])[2],
                                                                        "--probe-export"], 2, autoep_env=True,
                                                   allow_fail=True)
                run["rounds"].append(round_)
            out["runs"][size] = run
        return out

    def shard(self) -> dict:
        """Table 1b (issue 18): what ZeRO-3 holds per rank and the steady-state step at ep = world, this checkout
        against ep-ds-shim 0.2.0 (its own environment: DeepSpeed got the layout's mpu, every rank of an EP group the
        same batch) and DeepSpeed AutoEP with the batch split over ranks; the same global batch for every side."""
        pythons = {"autoep": envs.ensure_autoep_env(log=self.log), "baseline": envs.ensure_baseline_env(log=self.log)}
        out = {"transformers": envs.AUTOEP_TRANSFORMERS, "sequences": SHARD_SEQUENCES,
               "baseline": {"version": envs.BASELINE_VERSION, "commit": envs.BASELINE_COMMIT}, "runs": []}
        for size, nproc, steps, rounds in self.plan["shard"]:
            path = self.checkpoint(size)
            bytes_ = common.checkpoint_bytes(path)
            run = {"checkpoint": path.name, "size": size, "family": family_of(size), "bytes": bytes_,
                   "ranks": nproc, "steps": steps, "rounds": []}
            if size.startswith("large") and self.left() < 60 * (8 if not self.args.quick else 1):
                self.log(f"shard {size}: skipped, not enough time left in the budget ({self.left():.0f}s)")
                run["skipped"] = "time budget"
                out["runs"].append(run)
                continue
            reference = OUT / f"reference-{size}-{steps}x{SHARD_SEQUENCES}.json"
            self.log(f"shard on {path.name}, {nproc} ranks ({steps} steps, {rounds} round(s)): reference")
            subprocess.run([str(pythons["autoep"]), str(HERE / "reference.py"), str(path), str(reference), "--steps",
                            str(steps), "--sequences", str(SHARD_SEQUENCES)], check=True, env=self.env(True),
                           capture_output=True)
            run["reference"] = json.loads(reference.read_text())
            for index in range(rounds):
                order = list(SHARD_SIDES) if index % 2 == 0 else list(SHARD_SIDES)[::-1]
                round_ = {"order": [name for name, _ in order]}
                for name, batch in order:
                    job_name = f"shard-{size}-{nproc}ranks-r{index}-{name}"
                    if not self.wait_for_memory(common.training_memory_mb(bytes_, nproc), job_name):
                        round_[name] = []
                        continue
                    _, round_[name] = self.shard_side(job_name, name, batch, path, nproc, steps, pythons)
                run["rounds"].append(round_)
            out["runs"].append(run)
            if "step_profiles" not in out and nproc <= (os.cpu_count() or 1) and (
                    self.args.profile_steps or self.shim_slower(run)):
                out["step_profiles"] = self.profile_steps(path, nproc, steps, pythons)
        return out

    @staticmethod
    def shim_slower(run) -> bool:
        """The shim's steady-state step was slower than AutoEP split's in some round (then the run profiles both)."""
        reference = run["reference"]["losses"]
        for rnd in run["rounds"]:
            if rnd.get("shim") and rnd.get("autoep-plain-split"):
                one = render.shard_metrics(rnd["shim"], reference)
                other = render.shard_metrics(rnd["autoep-plain-split"], reference)
                if one["ok"] and other["ok"] and (one["steady_step_s"] or 0) > (other["steady_step_s"] or 0):
                    return True
        return False

    def profile_steps(self, path, nproc, steps, pythons) -> dict:
        """One more job of the shim and of AutoEP split with `BENCH_PROFILE_STEPS`: cProfile of rank 0's steps from
        the third on, where the step time goes (render.step_profile)."""
        out = {}
        for name, batch in (("shim", "split"), ("autoep-plain-split", "split")):
            prof = OUT / f"profile-steps-{name}.prof"
            prof.unlink(missing_ok=True)
            job_name = f"shard-profile-steps-{name}"
            if not self.wait_for_memory(common.training_memory_mb(common.checkpoint_bytes(path), nproc), job_name):
                continue
            os.environ.update(BENCH_PROFILE_STEPS=str(prof), BENCH_PROFILE_CLOCK=self.args.profile_clock)
            try:
                self.shard_side(job_name, name, batch, path, nproc, steps, pythons)
            finally:
                os.environ.pop("BENCH_PROFILE_STEPS", None)
                os.environ.pop("BENCH_PROFILE_CLOCK", None)
            if prof.exists():
                out[name] = {"file": str(prof.relative_to(REPO)), "checkpoint": path.name, "ranks": nproc,
                             "steps": steps - 2, "clock": self.args.profile_clock}
        return out

    def shard_side(self, job_name, name, batch, path, nproc, steps, pythons):
        common_args = ["--steps", steps, "--sequences", SHARD_SEQUENCES, "--batch", batch]
        if name.startswith("autoep"):
            return self.job(job_name, pythons["autoep"], "autoep_worker.py",
                            [path, "{json}", "--family", family_of(path.name), "--load", "plain", *common_args],
                            nproc, autoep_env=True, allow_fail=True)
        baseline = name != "shim"
        rc, reports = self.job(job_name, pythons["baseline" if baseline else "autoep"], "bench_worker.py",
                               ["train", path, "{json}", *common_args], nproc, autoep_env=not baseline,
                               baseline_env=baseline)
        wanted = envs.baseline_env_dir() if baseline else REPO
        where = {r.get("ep_ds_shim_file") for r in reports}
        if any(not str(f).startswith(str(wanted)) for f in where):  # PYTHONPATH or an editable install shadowed it
            raise RuntimeError(f"{job_name}: ran ep_ds_shim from {where}, expected it under {wanted}")
        return rc, reports

    def wait_for_memory(self, need_mb: float, name: str) -> bool:
        """Wait (up to --memory-wait minutes) until the machine has `need_mb` available: others share it, and a
        job that runs it out of memory kills theirs too. False (the job is skipped) if it never does."""
        deadline = time.monotonic() + 60 * self.args.memory_wait
        logged = False
        while True:
            available = common.available_mb()
            if available is None or available >= need_mb:
                return True
            if time.monotonic() >= deadline:
                self.log(f"  {name}: skipped, {available:.0f} MB available, it needs about {need_mb:.0f} MB")
                return False
            if not logged:
                self.log(f"  {name}: waiting for {need_mb:.0f} MB of memory ({available:.0f} MB available)")
                logged = True
            time.sleep(15)

    def growth(self) -> dict:
        """Tables 2 and 3: load, fingerprints and integrity check at the realistic sizes, 2 and 4 ranks."""
        out = {"configs": []}
        for size in self.plan["growth"]["sizes"]:
            path = self.checkpoint(size)
            for nproc in self.plan["growth"]["ranks"]:
                _, reports = self.job(f"growth-{size}-{nproc}ranks", self.main_python, "bench_worker.py",
                                      ["scale", path, "{json}"], nproc)
                out["configs"].append({"checkpoint": path.name, "size": size, "ranks": nproc,
                                       "bytes": common.checkpoint_bytes(path), "reports": reports})
        return out

    def export(self) -> dict:
        """Table 5: the streamed export against the previous one (gather to rank 0), max_shard_size = 1/8 of the
        model, at the realistic sizes on 2 and 4 ranks; two jobs per configuration, one with each export first."""
        out = {"configs": [], "shard_fraction": 8}
        export_dir = OUT / "export-tmp"
        for size in self.plan["export"]["sizes"]:
            path = self.checkpoint(size)
            for nproc in self.plan["export"]["ranks"]:
                runs = []
                for order in ("stream,previous", "previous,stream"):  # one job each: neither side always first
                    shutil.rmtree(export_dir, ignore_errors=True)
                    _, reports = self.job(f"export-{size}-{nproc}ranks-{order.split(',')[0]}-first", self.main_python,
                                          "bench_worker.py", ["export", path, "{json}", "--export-dir", export_dir,
                                                              "--shard-fraction", out["shard_fraction"], "--order",
                                                              order], nproc)
                    runs.append({"order": order, "reports": reports})
                shutil.rmtree(export_dir, ignore_errors=True)
                out["configs"].append({"checkpoint": path.name, "size": size, "ranks": nproc,
                                       "bytes": common.checkpoint_bytes(path), "runs": runs})
        return out

    def resume(self) -> dict:
        """Table 6: save_checkpoint, the resume in the same layout, and in another one (conversion + universal load)."""
        out = {"configs": []}
        directory = OUT / "checkpoint-tmp"
        for size in self.plan["resume"]:
            path = self.checkpoint(size)
            shutil.rmtree(directory, ignore_errors=True)
            config = {"checkpoint": path.name, "size": size, "bytes": common.checkpoint_bytes(path)}
            for name, mode, nproc in (("save", "save", 2), ("same_layout", "resume", 2), ("other_layout", "resume", 4)):
                _, config[name] = self.job(f"resume-{size}-{name}", self.main_python, "checkpoint_worker.py",
                                           [mode, path, "{json}", directory, "--ep-size", 2], nproc)
            shutil.rmtree(directory, ignore_errors=True)
            out["configs"].append(config)
        return out

    def profile(self) -> dict:
        """cProfile of rank 0 of the realistic-size load + integrity check (the growth job without the export):
        where the shim's own time goes, for the targets it misses."""
        path = self.checkpoint(self.plan["growth"]["sizes"][0])
        prof = OUT / "profile-shim-load.prof"
        prof.unlink(missing_ok=True)
        previous = os.environ.get("BENCH_PROFILE")
        os.environ["BENCH_PROFILE"] = str(prof)
        try:
            self.job("profile-load", self.main_python, "bench_worker.py", ["scale", path, "{json}"], 2)
        finally:
            if previous is None:
                os.environ.pop("BENCH_PROFILE", None)
            else:
                os.environ["BENCH_PROFILE"] = previous
        return {"checkpoint": path.name, "file": str(prof.relative_to(REPO)), "entries": render.profile_entries(prof)}

    def ratio(self) -> dict:
        """Table 4: the shim's load / the EP-only load, until the median's 95% CI is narrower than --precision."""
        path = self.checkpoint(self.plan["ratio"])
        out = {"checkpoint": path.name, "bytes": common.checkpoint_bytes(path), "precision": self.args.precision,
               "jobs": []}
        job_seconds = None
        for index in range(self.args.max_ratio_jobs or self.plan["ratio_jobs"]):
            if index >= 2 and job_seconds and self.left() < job_seconds + 20:
                self.log(f"ratio: stopping, time budget spent ({self.left():.0f}s left)")
                out["stopped"] = "time budget"
                break
            schedule = ("ABBA" if index % 2 == 0 else "BAAB") * (self.args.pairs_per_job // 2)
            started = time.monotonic()
            _, reports = self.job(f"ratio-{index}", self.main_python, "bench_worker.py",
                                  ["loads", path, "{json}", "--schedule", schedule], 2)
            job_seconds = time.monotonic() - started
            out["jobs"].append({"schedule": schedule, "reports": reports})
            stats = common.spread(render.load_pairs(out)["ratio"])
            halfwidth = common.relative_halfwidth(stats)
            self.log(f"ratio after {stats['n']} pairs: median {stats['median']:.3f} "
                     f"(95% CI {stats['ci_low']:.3f}-{stats['ci_high']:.3f}, +-{100 * halfwidth:.1f}%)")
            if stats["n"] >= self.args.min_pairs and halfwidth <= self.args.precision:
                out["stopped"] = "precision reached"
                break
        else:
            out["stopped"] = "job cap"
        return out

    def run(self) -> dict:
        sections = self.args.sections.split(",")
        self.results.update(command=self.args.command, date=datetime.datetime.now().isoformat(timespec="seconds"),
                            mode="quick" if self.args.quick else "full", machine=render.machine(),
                            not_run=[s for s in SECTIONS if s not in sections])
        for section in SECTIONS:
            if section not in sections:
                continue
            self.log(f"== {section}")
            self.results["sections"][section] = getattr(self, section)()
            (OUT / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        self.results["seconds"] = time.monotonic() - self.started
        (OUT / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        return self.results


def _started_by_run_sh() -> bool:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as handle:
            parent = handle.read().split(b"\0")
    except OSError:
        return False
    return any(part.endswith(b"run.sh") for part in parent) and b"bench" in parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small checkpoints only")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--max-minutes", type=float, help="time budget of the whole run (default: 25 full, 10 quick)")
    parser.add_argument("--precision", type=float, default=0.015,
                        help="stop adding load pairs once the median ratio's 95%% CI half-width is below this")
    parser.add_argument("--min-pairs", type=int, default=24)
    parser.add_argument("--pairs-per-job", type=int, default=6)
    parser.add_argument("--max-ratio-jobs", type=int, help="cap on the ratio section's jobs (default 10 full, 3 quick)")
    parser.add_argument("--autoep-variants",
                        help="AutoEP's sides, comma-separated load[:batch]: load plain (from_pretrained on every rank, "
                             "as its docs do) or zinit (under zero.Init); batch same (every rank all of the step's "
                             "global batch, as ep-ds-shim 0.2's EP group trained; default) or split (each rank a "
                             "slice, as the shim's ranks train); e.g. plain:split,plain,zinit")
    parser.add_argument("--profile-steps", action="store_true",
                        help="shard section: profile the steady-state steps of the shim and AutoEP split even when "
                             "the shim is not slower (it does when it is)")
    parser.add_argument("--profile-clock", choices=["cpu", "wall"], default="cpu",
                        help="the step profile's clock: this process's CPU seconds (default: the work, without the "
                             "waits a shared machine adds) or wall seconds (with the waits for the other rank)")
    parser.add_argument("--memory-wait", type=float, default=10.0,
                        help="minutes a large training job waits for enough free memory before it is skipped")
    parser.add_argument("--render-only", action="store_true", help="re-render build/bench/results.json")
    args = parser.parse_args(argv)
    rest = "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    args.command = ("./run.sh bench" if _started_by_run_sh() else "python benchmarks/run.py") + rest
    OUT.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        results = json.loads((OUT / "results.json").read_text())
    else:
        results = Bench(args).run()
    path = HERE / "results.md"
    text = render.markdown(results, previous=path.read_text() if path.exists() else "")
    path.write_text(text)
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
