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
MICRO, SEQ = 2, 16  # sequences per optimizer step (the global batch of the compare section), tokens per sequence
BATCH_SEED = 4321
# How a rank's batch relates to the step's global batch: "split" = each rank its own slice (data-parallel ranks:
# ep-ds-shim 0.3, AutoEP); "same" = every rank all of it (ep-ds-shim 0.2's EP group, which shared one batch).
BATCH_MODES = ("split", "same")


def step_batch(step: int, vocab_size: int, sequences: int = MICRO):
    """The global batch of optimizer step `step` (`sequences` x SEQ tokens), the same in every variant and in the
    single-process reference."""
    import torch

    generator = torch.Generator().manual_seed(BATCH_SEED + step)
    return torch.randint(0, vocab_size, (sequences, SEQ), generator=generator)


def per_rank_sequences(sequences: int, world: int, mode: str) -> int:
    """Sequences a rank trains on per step for a global batch of `sequences`: a 1/world slice ("split") or all of
    it ("same")."""
    if mode not in BATCH_MODES:
        raise ValueError(f"batch mode {mode!r}: expected one of {BATCH_MODES}")
    if mode == "same":
        return sequences
    if sequences % world:
        raise ValueError(f"a global batch of {sequences} sequences does not split over {world} ranks; "
                         f"use a multiple of {world}")
    return sequences // world


def rank_batch(batch, rank: int, world: int, mode: str):
    """This rank's part of the step's global batch `batch` (rows = sequences): rows [rank*n, (rank+1)*n) of it
    ("split"), or all of it ("same")."""
    count = per_rank_sequences(len(batch), world, mode)
    return batch if mode == "same" else batch[rank * count:(rank + 1) * count]


def mean_over_ranks(loss, world: int) -> float:
    """The step's loss over the global batch: the mean of the ranks' losses (every rank's slice has the same number
    of tokens; with "same" batches every rank's loss is already the batch's)."""
    import torch.distributed as dist

    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return mean.item() / world


def ds_config(*, autoep_size: int | None = None, family: str = "qwen3_moe", micro: int = MICRO) -> dict:
    """The DeepSpeed config of every side: ZeRO-3, fp32, clipping 1.0, one micro-batch of `micro` sequences per rank
    per step; AutoEP's section (as its docs and tests spell it) only for AutoEP."""
    config = {
        "train_micro_batch_size_per_gpu": micro,
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


def available_mb() -> float | None:
    """MemAvailable of the machine, in MB (None where /proc/meminfo has no such line)."""
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return None


# Peak RSS of a training rank: a process's fixed cost (torch, transformers, DeepSpeed: ~0.5 GB measured at 13 MB) plus
# a multiple of the bytes it must hold (dense + its experts: ~9.9x at 1.5 GB on 0.2.0 and AutoEP, 8.6-8.9 GB per
# rank for 818 MB: parameters, fp32 master, gradients, Adam's two moments, gathered layers, allocator slack).
TRAINING_RSS_PER_HELD_BYTE = 10.0
PROCESS_BASE_MB = 600.0


def training_memory_mb(checkpoint_bytes: dict, ranks: int) -> float:
    """About how much memory a training job of `ranks` ranks (EP over all of them) needs at its peak, in MB."""
    held = (checkpoint_bytes["dense"] + checkpoint_bytes["experts"] / ranks) / 2**20
    return ranks * (TRAINING_RSS_PER_HELD_BYTE * held + PROCESS_BASE_MB)


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


# --- ZeRO-3 state held per rank ----------------------------------------------------------------------------------


def is_expert_parameter(name: str, param) -> bool:
    """An expert weight: one DeepSpeed marks as a MoE parameter (`allreduce=False`: ep-ds-shim 0.3's and AutoEP's
    experts), or one inside an `experts` module (ep-ds-shim 0.2 tags nothing). Everything else is dense (attention,
    embeddings, norms, routers)."""
    return getattr(param, "allreduce", True) is False or "experts" in name.split(".")[:-1]


def zero3_rows(engine) -> tuple[list[dict], list[dict]]:
    """What ZeRO-3 keeps on this rank, read from the engine after a step (Adam's moments exist from the first step
    on): per parameter, whether it is an expert, the elements of its partition (`ds_tensor.numel()`), of the whole
    parameter (`ds_numel`) and its element size; per optimizer sub-group, the partition elements of its dense
    parameters, of all its parameters, and the bytes of its optimizer state (Adam's tensors, plus the fp32 master
    partition when it is a copy of the parameters' partition rather than that partition itself)."""
    rows = [{"expert": is_expert_parameter(name, p), "held": p.ds_tensor.numel(), "full": p.ds_numel,
             "element_size": p.ds_tensor.element_size()} for name, p in engine.module.named_parameters()]
    optimizer = engine.optimizer
    expert_ids = {id(p) for name, p in engine.module.named_parameters() if is_expert_parameter(name, p)}
    subgroups = []
    for index, params in enumerate(optimizer.fp16_groups):
        master = optimizer.fp32_partitioned_groups_flat[index]
        own = optimizer.fp16_partitioned_groups_flat[index]
        state = {key: t for key, t in optimizer.optimizer.state.get(master, {}).items() if hasattr(t, "numel")}
        state_bytes = sum(t.numel() * t.element_size() for t in state.values())
        master_copy = own is None or master.untyped_storage().data_ptr() != own.untyped_storage().data_ptr()
        if master_copy:
            state_bytes += master.numel() * master.element_size()
        subgroups.append({"dense": sum(p.partition_numel() for p in params if id(p) not in expert_ids),
                          "total": sum(p.partition_numel() for p in params), "state_bytes": state_bytes,
                          "state": {key: t.numel() for key, t in state.items()}, "master_copy": master_copy})
    return rows, subgroups


def zero3_summary(rows: list[dict], subgroups: list[dict], world: int) -> dict:
    """Dense and expert state held by one rank, from `zero3_rows`: parameter elements held against whole (dense:
    the fraction of the dense parameters this rank holds, 1/world when ZeRO-3 partitions them over every rank), and
    the optimizer state's bytes, the dense part attributed by each sub-group's dense share of its partition
    elements; `dense_optimizer_full_bytes` is what this rank would hold for the dense parameters unpartitioned."""
    dense = [r for r in rows if not r["expert"]]
    experts = [r for r in rows if r["expert"]]
    dense_held, dense_full = sum(r["held"] for r in dense), sum(r["full"] for r in dense)
    state_bytes = sum(g["state_bytes"] for g in subgroups)
    partition_elements = sum(g["total"] for g in subgroups)
    dense_state = sum(g["state_bytes"] * g["dense"] / g["total"] for g in subgroups if g["total"])
    per_element = state_bytes / partition_elements if partition_elements else 0.0
    return {
        "world": world,
        "dense_params": len(dense),
        "dense_held": dense_held,
        "dense_full": dense_full,
        "dense_fraction": dense_held / dense_full if dense_full else None,
        "dense_held_bytes": sum(r["held"] * r["element_size"] for r in dense),
        "dense_whole_params": sum(r["held"] == r["full"] for r in dense),
        "expert_params": len(experts),
        "expert_held": sum(r["held"] for r in experts),
        "expert_full": sum(r["full"] for r in experts),
        "expert_held_bytes": sum(r["held"] * r["element_size"] for r in experts),
        "optimizer_bytes": state_bytes,
        "dense_optimizer_bytes": dense_state,
        "dense_optimizer_full_bytes": dense_full * per_element,
    }


def zero3_state(engine, world: int) -> dict:
    """`zero3_summary` of this rank's engine, with the optimizer's sub-groups as read."""
    rows, subgroups = zero3_rows(engine)
    return {**zero3_summary(rows, subgroups, world), "subgroups": subgroups}


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


def timed_steps(engine, steps: int, vocab_size: int, barrier, *, rank: int, slice_batch=None, step_loss=None,
                sequences: int = MICRO) -> dict:
    """The measured training loop of every side of the comparison: step `k` trains on `step_batch(k, sequences)`
    (this rank's part of it if `slice_batch` is given) after a barrier; seconds, CPU seconds and the loss
    (`step_loss(loss)`, default `loss.item()`) of every step, and the peak RSS of the loop. `BENCH_PROFILE_STEPS`
    profiles rank 0."""
    losses, times, cpu_times = [], [], []
    reset_peak()
    profile = StepProfile(rank)
    for step in range(steps):
        profile.at_step(step)
        batch = step_batch(step, vocab_size, sequences)
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
    """`BENCH_PROFILE_STEPS=out.prof`: cProfile of rank 0's training steps from the third on (the steady state), in
    wall seconds, or in this process's CPU seconds with `BENCH_PROFILE_CLOCK=cpu` (what each function costs, without
    the waits for a core or for the other ranks that a shared machine adds to wall time)."""

    def __init__(self, rank: int, first: int = 2):
        self.path = os.environ.get("BENCH_PROFILE_STEPS") if rank == 0 else None
        self.clock = time.process_time if os.environ.get("BENCH_PROFILE_CLOCK") == "cpu" else time.perf_counter
        self.first = first
        self.profiler = None

    def at_step(self, step: int) -> None:
        if self.path and step == self.first:
            import cProfile

            self.profiler = cProfile.Profile(self.clock)
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
