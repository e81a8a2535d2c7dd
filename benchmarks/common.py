"""Shared by the benchmark's orchestrator (run.py) and its per-rank workers, in either environment: memory
readings, page-cache pre-warming, checkpoint byte counts, the training set-up both sides of the AutoEP comparison
use, and the statistics the tables are made of. Imports nothing heavy at module level.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import resource
import statistics
import time
from pathlib import Path

# --- the training set-up of the shim-vs-AutoEP comparison (both sides and the single-process reference) ---------
LR, EPS, WEIGHT_DECAY, CLIP = 1e-3, 1e-4, 0.01, 1.0  # = ep_ds_shim.testing.OPTIMIZER, DeepSpeed's default clipping
MICRO, SEQ = 2, 16  # samples per rank per step (every rank the same batch: one EP group), tokens per sample
BATCH_SEED = 4321


def step_batch(step: int, vocab_size: int):
    """The batch of optimizer step `step`: the same on every rank (one EP group) and in the reference."""
    import torch

    generator = torch.Generator().manual_seed(BATCH_SEED + step)
    return torch.randint(0, vocab_size, (MICRO, SEQ), generator=generator)


def ds_config(*, autoep_size: int | None = None, family: str = "qwen3_moe") -> dict:
    """The DeepSpeed config of both sides: ZeRO-3, fp32, clipping 1.0, one micro-batch per step; AutoEP's section
    (as its docs and tests spell it) only for AutoEP."""
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP,
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3},
    }
    if autoep_size is not None:
        config["expert_parallel"] = {"enabled": True, "autoep_size": autoep_size, "preset_model": family}
    return config


def adamw(params):
    import torch

    return torch.optim.AdamW(params, lr=LR, eps=EPS, weight_decay=WEIGHT_DECAY)


def warm_imports(path) -> None:
    """Import the checkpoint's model class before anything is timed: a fresh process otherwise pays transformers'
    lazy import of the modeling module (about a second) inside whichever load comes first."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(path))]


# --- memory -----------------------------------------------------------------------------------------------------


def status_mb() -> dict:
    """VmRSS / VmHWM (peak since start or since the last reset) / RssAnon / RssFile of this process, in MB."""
    fields = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                fields[key] = int(line.split()[1]) / 1024
    return fields


def reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0), so a phase's peak is its own."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    """Peak RSS since the last `reset_peak` (VmHWM); without it, since the process started."""
    value = status_mb().get("VmHWM")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_memory() -> None:
    """Collect garbage and return freed heap to the OS, so the next measurement starts from the same state."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure(report: dict, name: str, fn, barrier=None, timers=None):
    """Run `fn` as one measured phase of a worker: the barrier, the peak-RSS counter reset, then seconds, CPU
    seconds, peak RSS and the RSS split (anonymous / file-backed) before and after, under report[name]; the shim's
    direct timers too when given (`timers()` returns and resets them)."""
    if barrier:
        barrier()
    reset_peak()
    before = status_mb()
    started, cpu_started = time.perf_counter(), time.process_time()
    result = fn()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    after = status_mb()
    report[name] = {"s": seconds, "cpu_s": cpu_seconds, "peak_mb": peak_mb(), "rss_before_mb": before.get("VmRSS"),
                    "anon_before_mb": before.get("RssAnon"), "file_before_mb": before.get("RssFile"),
                    "anon_after_mb": after.get("RssAnon"), "file_after_mb": after.get("RssFile")}
    if timers is not None:
        report[name]["timers"] = timers()
    return result


def prewarmed_barrier(report: dict, path, rank: int, barrier) -> None:
    """The same start for every load: heap returned to the OS, then (rank 0, between two barriers) the whole
    checkpoint read into the page cache; its seconds are appended to report['prewarm_s']."""
    release_memory()
    barrier()
    if rank == 0:
        report.setdefault("prewarm_s", []).append(prewarm(path))
    barrier()


def run_worker(main) -> None:
    """A worker's entry point: `BENCH_PROFILE=out.prof` in its environment profiles rank 0 with cProfile (how the
    profiler findings in the README were made)."""
    if os.environ.get("BENCH_PROFILE") and os.environ.get("RANK") == "0":
        import cProfile

        cProfile.runctx("main()", globals(), {"main": main}, os.environ["BENCH_PROFILE"])
    else:
        main()


# --- checkpoints ------------------------------------------------------------------------------------------------


def checkpoint_files(path) -> list[Path]:
    return sorted(Path(path).glob("*.safetensors"))


def checkpoint_bytes(path) -> dict:
    """{'dense': bytes, 'experts': bytes, 'total': bytes, 'files': bytes} from the safetensors headers."""
    dense = experts = files = 0
    for file in checkpoint_files(path):
        files += file.stat().st_size
        with open(file, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            nbytes = meta["data_offsets"][1] - meta["data_offsets"][0]
            if "experts" in name.split(".")[:-1]:
                experts += nbytes
            else:
                dense += nbytes
    return {"dense": dense, "experts": experts, "total": dense + experts, "files": files}


def same_tensors(first, second) -> dict:
    """Whether two exports hold the same keys with bit-identical values (read one tensor at a time)."""
    import torch
    from safetensors import safe_open

    def where(path):
        return {key: file for file in checkpoint_files(path) for key in safe_open(str(file), "pt").keys()}

    left, right = where(first), where(second)
    differing = []
    for key in sorted(set(left) & set(right)):
        with safe_open(str(left[key]), "pt") as a, safe_open(str(right[key]), "pt") as b:
            x, y = a.get_tensor(key), b.get_tensor(key)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                differing.append(key)
    return {"keys": len(left), "same_keys": set(left) == set(right), "differing": differing[:5],
            "identical": set(left) == set(right) and not differing}


_READ_BUFFER = bytearray(16 << 20)


def prewarm(path) -> float:
    """Read every checkpoint file once, so each measurement starts with the whole checkpoint in the page cache
    (the same cache state for every variant, whatever ran before). Returns the seconds it took."""
    started = time.perf_counter()
    view = memoryview(_READ_BUFFER)
    for file in checkpoint_files(path):
        with open(file, "rb", buffering=0) as handle:
            while handle.readinto(view):
                pass
    return time.perf_counter() - started


def timed_steps(engine, steps: int, vocab_size: int, barrier, *, rank: int, slice_batch=None, step_loss=None) -> dict:
    """The measured training loop of both sides of the comparison: step `k` trains on `step_batch(k)` (sliced for
    this rank if `slice_batch` is given) after a barrier; seconds, CPU seconds and the loss (`step_loss(loss)`,
    default `loss.item()`) of every step, and the peak RSS of the loop. `BENCH_PROFILE_STEPS` profiles rank 0."""
    losses, times, cpu_times = [], [], []
    reset_peak()
    profile = StepProfile(rank)
    for step in range(steps):
        profile.at_step(step)
        batch = step_batch(step, vocab_size)
        if slice_batch is not None:
            batch = slice_batch(batch)
        barrier()
        started, cpu_started = time.perf_counter(), time.process_time()
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
        losses.append(step_loss(loss) if step_loss is not None else loss.item())
    profile.done()
    return {"losses": losses, "s": times, "cpu_s": cpu_times, "peak_mb": peak_mb()}


class StepProfile:
    """`BENCH_PROFILE_STEPS=out.prof`: cProfile of rank 0's training steps from the third on (the steady state)."""

    def __init__(self, rank: int, first: int = 2):
        self.path = os.environ.get("BENCH_PROFILE_STEPS") if rank == 0 else None
        self.first = first
        self.profiler = None

    def at_step(self, step: int) -> None:
        if self.path and step == self.first:
            import cProfile

            self.profiler = cProfile.Profile()
            self.profiler.enable()

    def done(self) -> None:
        if self.profiler is not None:
            self.profiler.disable()
            self.profiler.dump_stats(self.path)


# --- statistics -------------------------------------------------------------------------------------------------


def spread(values) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {}
    out = {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}
    low, high = median_ci(values)
    out.update(ci_low=low, ci_high=high)
    return out


def median_ci(values, confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median (order statistics of the binomial(n, 1/2)); with fewer
    than 6 values the interval is the full range."""
    ordered = sorted(values)
    n = len(ordered)
    if n < 6:
        return ordered[0], ordered[-1]
    alpha = 1 - confidence
    # largest k with P(Binomial(n, 1/2) < k) <= alpha/2: the interval is [x_(k), x_(n-k+1)] (1-based)
    cumulative, k = 0.0, 0
    for j in range(n + 1):
        p = math.comb(n, j) / 2**n
        if cumulative + p > alpha / 2:
            break
        cumulative += p
        k = j + 1
    k = max(k, 1)
    return ordered[k - 1], ordered[n - k]


def relative_halfwidth(stats: dict) -> float:
    """Half the width of the median's confidence interval, relative to the median."""
    if not stats:
        return math.inf
    return (stats["ci_high"] - stats["ci_low"]) / 2 / stats["median"]
