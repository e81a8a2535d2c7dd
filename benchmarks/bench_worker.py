"""One rank of one benchmark measurement, in a fresh process so its peak RSS is its own.

    torchrun --nproc_per_node N benchmarks/bench_worker.py <variant> <checkpoint> <report.json>

variants:
  ep_only        EP load, ZeRO-3 not signalled (the baseline)
  ep_zero3       EP load with ZeRO-3 signalled, inside ep_zero3_compat()
  dense_zero3    what users do otherwise: ZeRO-3 signalled, no EP, zero.Init partitions every weight
  ep_zero3_step  ep_zero3 + ep_ds_shim.initialize (DP x EP groups) + one training step
  dense_zero3_step  dense_zero3 + deepspeed.initialize + one training step
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import torch
import torch.distributed as dist


def rss_now_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_split_mb() -> dict:
    """Resident memory right now, split into anonymous (heap: tensors) and file-backed (mmap'ed checkpoint)."""
    fields = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("RssAnon:", "RssFile:")):
                name, value, _ = line.split()
                fields[name.rstrip(":")] = int(value) / 1024
    return {"rss_anon_mb": fields.get("RssAnon"), "rss_file_mb": fields.get("RssFile")}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(variant: str, path: str, report_path: str) -> None:
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    import ep_ds_shim
    from ep_ds_shim import testing

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = ep_ds_shim.DPxEPLayout(world)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}
    ep = variant.startswith("ep_")
    kwargs = layout.from_pretrained_kwargs(path) if ep else {}
    hf = HfDeepSpeedConfig(ds_config) if "zero3" in variant else None  # noqa: F841
    dist.barrier()
    baseline = rss_now_mb()
    baseline_split = rss_split_mb()
    started = time.perf_counter()
    if variant.startswith("ep_zero3"):
        with ep_ds_shim.ep_zero3_compat():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    load_seconds = time.perf_counter() - started
    load_peak = peak_rss_mb()
    held = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
        for p in model.parameters()
        if not hasattr(p, "ds_numel")
    ) + sum(p.ds_tensor.numel() * p.element_size() for p in model.parameters() if hasattr(p, "ds_tensor"))
    report = {"rank": rank, "world": world, "variant": variant, "load_seconds": load_seconds,
              "baseline_rss_mb": baseline, "load_peak_rss_mb": load_peak, "held_param_mb": held / 2**20,
              "baseline_split": baseline_split, "after_load_split": rss_split_mb()}
    if variant.endswith("_step"):
        batch = testing.batch_for(layout.dp_rank, vocab_size=model.config.vocab_size, batch=1)
        dist.barrier()
        started = time.perf_counter()
        optimizer = torch.optim.AdamW(model.parameters(), **testing.OPTIMIZER)
        if ep:
            engine, *_ = ep_ds_shim.initialize(model=model, layout=layout, optimizer=optimizer, config=ds_config)
        else:
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        report["initialize_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        report["first_step_seconds"] = time.perf_counter() - started
        report["step_peak_rss_mb"] = peak_rss_mb()
    with open(report_path.format(rank=rank), "w") as handle:
        json.dump(report, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if os.environ.get("BENCH_PROFILE") and os.environ.get("RANK") == "0":
        # `BENCH_PROFILE=out.prof`: profile rank 0 (how the README's profiler findings were made)
        import cProfile

        cProfile.run("main(*sys.argv[1:4])", os.environ["BENCH_PROFILE"])
    else:
        main(*sys.argv[1:4])
