"""One rank of a benchmark job on the shim's side (the orchestrator is run.py).

    torchrun --nproc_per_node N benchmarks/bench_worker.py <mode> <checkpoint> <report-{rank}.json> [options]

modes:
  loads   the load-time ratio: in one process, alternating timed loads of
            A = EP-only load (ZeRO-3 not signalled, no shim: the baseline) and
            B = EP load with ZeRO-3 signalled, inside ep_zero3_compat() (the shim's path),
          in the order --schedule gives (e.g. ABBAABBA), after one discarded warm-up load of each. Before every
          load: garbage collected and heap returned to the OS, the checkpoint read once into the page cache (same
          cache state for every load), a barrier, the peak-RSS counter reset. The shim's own time is timed
          directly (shim_timers) as a cross-check of the ratio.
  train   the shim's side of the AutoEP comparison: EP load under ZeRO-3 inside the block, ep_ds_shim.initialize,
          --steps training steps on the reference's global batches of --sequences sequences: each rank its own
          slice (--batch split, ep-ds-shim 0.3: every rank a data-parallel rank) or all of it (--batch same, what
          ep-ds-shim 0.2's EP group trained on); losses (mean over ranks), times, peak RSS, and the ZeRO-3 state
          each rank holds after the steps (dense / expert partitions, optimizer state: common.zero3_state).
          Runs with either release of the library (the 0.2.0 baseline's environment too).
  scale   the realistic-size table: EP load under ZeRO-3 (timed, fingerprints timed), ep_ds_shim.initialize,
          verify_expert_integrity, each with its peak RSS.
  export  the export table: EP load under ZeRO-3, ep_ds_shim.initialize, then two exports with
          max_shard_size = the model's bytes / --shard-fraction, in the order --order gives: "stream" =
          ep_ds_shim.save_pretrained (streamed, every rank writes), "previous" = the previous implementation (the
          whole state dict gathered to global rank 0, written there by transformers' save_pretrained). Each: heap
          returned to the OS, a barrier, the peak-RSS counter reset; seconds, peak RSS growth, and the stream's
          own timers (transfers, conversion, writing, verification + move). Then rank 0 compares the two exports
          tensor by tensor.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import shim_timers  # noqa: E402


def held_mb(model) -> float:
    """Parameter + buffer bytes this rank holds (a DTensor's local shard; a ZeRO-3 parameter's partition)."""
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        if hasattr(tensor, "ds_tensor"):
            total += tensor.ds_tensor.numel() * tensor.ds_tensor.element_size()
        else:
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            total += local.numel() * local.element_size()
    return total / 2**20


def phase(report: dict, name: str, fn, barrier=None):
    """One measured phase (common.measure), with the shim's direct timers."""
    return common.measure(report, name, fn, barrier, timers=shim_timers.take)


def previous_export(engine, directory: str, max_shard_size: int) -> None:
    """The previous implementation: the whole state dict on global rank 0, written there by transformers."""
    import torch.distributed as dist

    from ep_ds_shim.training.export import gather_full_state_dict, single_process_save
    from ep_ds_shim.training.record import unwrap

    model = unwrap(engine)
    full = gather_full_state_dict(engine)
    if full is not None:
        with single_process_save(model):
            type(model).save_pretrained(model, directory, state_dict=full, max_shard_size=max_shard_size)
    del full
    dist.barrier()


def export_phases(engine, args, report: dict, rank: int) -> None:
    """The stream and previous exports (measured), their plan's bound, and whether they hold the same tensors."""
    import shutil

    import torch.distributed as dist

    import ep_ds_shim
    from ep_ds_shim.training.export.plan import build_plan
    from ep_ds_shim.training.record import record_of, unwrap

    model_bytes = common.checkpoint_bytes(args.checkpoint)["total"]
    shard = model_bytes // args.shard_fraction
    plan = build_plan(unwrap(engine), record_of(engine), max_shard_size=shard, variant=None,
                      save_original_format=True)
    report["export_plan"] = {"max_shard_size": shard, "model_bytes": plan.total_size, "shards": len(plan.shards),
                             "largest_tensor": max(e.nbytes for e in plan.entries.values()),
                             "largest_unit": plan.largest_unit()}
    directories = {"stream": os.path.join(args.export_dir, "stream"),
                   "previous": os.path.join(args.export_dir, "previous")}
    calls = {"stream": lambda: ep_ds_shim.save_pretrained(engine, directories["stream"], max_shard_size=shard),
             "previous": lambda: previous_export(engine, directories["previous"], shard)}
    for name in args.order.split(","):
        common.release_memory()
        if rank == 0:
            os.sync()  # the other export's dirty pages are written back now, not throttling this one
        phase(report, f"export_{name}", calls[name], barrier=dist.barrier)
    if rank == 0:
        report["exports_identical"] = common.same_tensors(directories["stream"], directories["previous"])
    dist.barrier()
    if rank == 0:
        shutil.rmtree(args.export_dir, ignore_errors=True)


def main() -> None:
    args = parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.allow_unverified:
        os.environ["EP_DS_SHIM_ALLOW_UNVERIFIED"] = "1"

    import torch.distributed as dist

    from ep_ds_shim.testing import write_report

    job = Job.start(args.checkpoint, args.mode)
    {"loads": run_loads, "train": run_train, "scale": run_scale, "export": run_export}[args.mode](job, args)
    write_report(args.report, job.report, rank=job.rank)
    dist.barrier()
    dist.destroy_process_group()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["loads", "train", "scale", "export"])
    parser.add_argument("checkpoint")
    parser.add_argument("report")
    parser.add_argument("--schedule", default="ABBA")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--sequences", type=int, default=None, help="the global batch (default: common.MICRO)")
    parser.add_argument("--batch", default="split", choices=["split", "same"])
    parser.add_argument("--export-dir")
    parser.add_argument("--shard-fraction", type=int, default=8)
    parser.add_argument("--order", default="stream,previous")
    parser.add_argument("--allow-unverified", action="store_true")
    return parser.parse_args()


@dataclass
class Job:
    """This rank of the job: the process group, the layout, the checkpoint, the EP arguments, and the report."""

    rank: int
    world: int
    layout: object
    path: str
    kwargs: dict
    report: dict

    @classmethod
    def start(cls, path: str, mode: str) -> "Job":
        """Timers installed, the process group, the layout, the checkpoint's imports warmed, the report's header."""
        import deepspeed
        import torch
        import torch.distributed as dist
        import transformers

        import ep_ds_shim

        torch.set_num_threads(1)
        shim_timers.install()
        deepspeed.init_distributed(dist_backend="gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        layout = ep_ds_shim.DPxEPLayout(world)
        common.warm_imports(path)
        kwargs = layout.from_pretrained_kwargs(path)
        report = {"rank": rank, "world": world, "mode": mode, "transformers": transformers.__version__,
                  "deepspeed": deepspeed.__version__, "torch": torch.__version__, "ep_size": layout.ep_size,
                  "dp_size": layout.dp_size, "ep_ds_shim": ep_ds_shim.__version__,
                  "ep_ds_shim_file": ep_ds_shim.__file__}
        return cls(rank, world, layout, path, kwargs, report)

    def prewarmed_barrier(self):
        import torch.distributed as dist

        common.prewarmed_barrier(self.report, self.path, self.rank, dist.barrier)

    def shim_load(self, with_kwargs=False):
        """What a user runs: the EP arguments for this release (train/scale: timed too), the block, the load."""
        import torch
        from transformers import AutoModelForCausalLM

        import ep_ds_shim

        load_kwargs = self.layout.from_pretrained_kwargs(self.path) if with_kwargs else self.kwargs
        block = ep_ds_shim.ep_zero3_compat()
        started = time.perf_counter()
        block.__enter__()
        shim_timers.add("block enter", time.perf_counter() - started)
        try:
            return AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32, **load_kwargs)
        finally:
            started = time.perf_counter()
            block.__exit__(None, None, None)
            shim_timers.add("block exit", time.perf_counter() - started)


def run_loads(job: Job, args) -> None:
    """The load-time ratio: alternating A (EP-only) and B (the shim's path) loads in the --schedule order."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    loads = []
    schedule = ("AB" if args.schedule[0] == "A" else "BA") + args.schedule  # warm-ups: one load of each
    for index, variant in enumerate(schedule):
        hf = HfDeepSpeedConfig(common.ds_config()) if variant == "B" else None
        assert is_deepspeed_zero3_enabled() == (variant == "B")
        entry = {"variant": variant, "warmup": index < 2}
        model = phase(entry, "load", job.shim_load if variant == "B" else
                      lambda: AutoModelForCausalLM.from_pretrained(job.path, dtype=torch.float32, **job.kwargs),
                      barrier=job.prewarmed_barrier)
        entry["held_mb"] = held_mb(model)
        del model, hf
        loads.append(entry)
    job.report["loads"] = loads


def run_train(job: Job, args) -> None:
    """The shim's side of the AutoEP comparison: load, initialize, --steps timed steps, the ZeRO-3 state held."""
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    import ep_ds_shim

    report, rank, world = job.report, job.rank, job.world
    sequences = args.sequences or common.MICRO
    config = common.ds_config(micro=common.per_rank_sequences(sequences, world, args.batch))
    report.update(batch_mode=args.batch, sequences=sequences, ds_config=config)
    hf = HfDeepSpeedConfig(config)  # noqa: F841 - ZeRO-3 signalled, as a DeepSpeed user has it
    model = phase(report, "load", lambda: job.shim_load(True), barrier=job.prewarmed_barrier)
    report["held_after_load_mb"] = held_mb(model)
    optimizer = common.adamw(model.parameters())
    engine, *_ = phase(report, "initialize", lambda: ep_ds_shim.initialize(
        model=model, layout=job.layout, optimizer=optimizer, config=config), barrier=dist.barrier)
    report["held_after_initialize_mb"] = held_mb(engine.module)
    report["dp_world_size"] = engine.dp_world_size
    report["steps"] = common.timed_steps(
        engine, args.steps, model.config.vocab_size, dist.barrier, rank=rank, sequences=sequences,
        slice_batch=lambda batch: common.rank_batch(batch, rank, world, args.batch),
        step_loss=lambda loss: common.mean_over_ranks(loss, world))
    report["steps"]["timers"] = shim_timers.take()
    report["zero3"] = common.zero3_state(engine, world)


def run_scale(job: Job, args) -> None:
    """The realistic-size table: load, initialize, three integrity checks."""
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    import ep_ds_shim

    report = job.report
    hf = HfDeepSpeedConfig(common.ds_config())  # noqa: F841
    model = phase(report, "load", lambda: job.shim_load(True), barrier=job.prewarmed_barrier)
    report["held_after_load_mb"] = held_mb(model)
    engine, *_ = phase(report, "initialize", lambda: ep_ds_shim.initialize(
        model=model, layout=job.layout, config=common.ds_config()), barrier=dist.barrier)
    for attempt in range(3):  # a cross-rank check: three calls, the median is reported
        phase(report, f"verify{attempt}", lambda: ep_ds_shim.verify_expert_integrity(engine), barrier=dist.barrier)


def run_export(job: Job, args) -> None:
    """The export comparison: load and initialize (not measured), then the stream and previous exports."""
    from transformers.integrations import HfDeepSpeedConfig

    import ep_ds_shim

    hf = HfDeepSpeedConfig(common.ds_config())  # noqa: F841
    model = job.shim_load(True)
    engine, *_ = ep_ds_shim.initialize(model=model, layout=job.layout, config=common.ds_config())
    export_phases(engine, args, job.report, job.rank)


if __name__ == "__main__":
    common.run_worker(main)
