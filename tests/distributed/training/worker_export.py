"""One rank of the export tests (run by torchrun from test_export.py).

    worker_export.py <checkpoint> <mode> <target> <report.json> [--max-shard-size S] [--ep-size N] [--kill POINT@RANK]

Loads the checkpoint with EP over the layout inside the block (ZeRO-3 signalled), hands it to DeepSpeed with
`ep_ds_shim.initialize` (`--as-loaded`: exports the model as loaded instead; `--no-zero3`: loaded without ZeRO-3
signalled, so its experts are still transformers' DTensors), then per mode:

  export      `ep_ds_shim.save_pretrained(engine, target)`; with --kill, one rank is SIGKILLed at POINT first
              (gather:N  before the N-th entry it gathers; write:N  after its N-th shard is written;
               partial:N  its N-th shard torn: written, truncated to half, then killed; verify  global rank 0
               before the final verification; commit  global rank 0 at its first rename into the target;
               committed  global rank 0 right after the move into place)
  compare     the streaming export to <target>/stream and, for reference, the previous implementation's: the whole
              state dict gathered to global rank 0 and written by transformers' own save_pretrained, to
              <target>/reference
  memory      a warm-up export, then the export to <target> with this rank's peak RSS growth measured (the kernel's
              high-water mark, reset before the export) and the bound it must keep
  one-rank    `if rank == 0: ep_ds_shim.save_pretrained(...)` (the others go on to a barrier)
  one-rank-verify  `if rank == 0: ep_ds_shim.verify_expert_integrity(engine)`
  one-rank-initialize  (with --as-loaded) `if rank == 0: ep_ds_shim.initialize(...)`
  rank-exits  rank 1 returns (its process ends) without exporting; the others export
  bad-targets the export to <target> (an existing file), then to <target>/model (a path under a file)

Each rank reports what it raised (type and message), how many entries it gathered and how long the call took.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist


def parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("mode")
    parser.add_argument("target")
    parser.add_argument("report")
    parser.add_argument("--max-shard-size", default="20KB")
    parser.add_argument("--ep-size", type=int)
    parser.add_argument("--kill", help="POINT@RANK")
    parser.add_argument("--as-loaded", action="store_true")
    parser.add_argument("--no-zero3", action="store_true", help="load without ZeRO-3 signalled (DTensor experts)")
    return parser.parse_args(argv)


def killer(point: str, victim: int, rank: int) -> None:
    """Wrap the export's seams so this rank is SIGKILLed at `point` (a test instrument; nothing else changes)."""
    from ep_ds_shim.training.export import gather, target, write

    if rank != victim:
        return
    kind, _, count = point.partition(":")
    calls = {"n": 0}

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def counted(module, name, *, after=False, torn=False):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls["n"] += 1
            due = calls["n"] == int(count or 1)
            if due and not after and not torn:
                die()
            result = original(*args, **kwargs)
            if due and torn:
                path = os.path.join(args[2], args[0].filename)
                with open(path, "r+b") as handle:
                    handle.truncate(os.path.getsize(path) // 2)
                die()
            if due and after:
                die()
            return result

        setattr(module, name, wrapper)

    if kind == "gather":
        counted(gather, "bring")
    elif kind == "write":
        counted(write, "write_shard", after=True)
    elif kind == "partial":
        # write_shard(shard, outputs, directory): written, then torn and killed
        counted(write, "write_shard", torn=True)
    elif kind == "verify":
        counted(write, "verify")
    elif kind == "commit":
        original_commit = target.Staging.commit

        def commit(self):
            for name in ("rename", "replace"):  # the first move into the target kills
                original = getattr(os, name)

                def moving(*args, _original=original, **kwargs):
                    if args and str(args[1]).startswith(self.target):
                        die()
                    return _original(*args, **kwargs)

                setattr(os, name, moving)
            return original_commit(self)

        target.Staging.commit = commit
    elif kind == "committed":
        counted(target.Staging, "commit", after=True)
    else:
        raise SystemExit(f"unknown kill point {point}")


def count_gathers() -> dict:
    from ep_ds_shim.training.export import gather

    counter = {"n": 0}
    original = gather.bring

    def bring(items, *args, **kwargs):
        counter["n"] += len(items)
        return original(items, *args, **kwargs)

    gather.bring = bring
    return counter


def main(argv) -> None:
    args = parse(argv)
    if args.max_shard_size.isdigit():  # bytes, as an int (transformers' own convention); else "20KB" and friends
        args.max_shard_size = int(args.max_shard_size)
    import deepspeed
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig

    import ep_ds_shim
    from ep_ds_shim import testing
    from ep_ds_shim.testing.tiny_models import model_class_for

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = ep_ds_shim.DPxEPLayout(args.ep_size or world)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}
    hf = None if args.no_zero3 else HfDeepSpeedConfig(config)  # noqa: F841 - keeps ZeRO-3 signalled, as launchers do
    model_class = model_class_for(AutoConfig.from_pretrained(args.checkpoint).model_type)
    with ep_ds_shim.ep_zero3_compat():
        model = model_class.from_pretrained(args.checkpoint, dtype=torch.float32,
                                            **layout.from_pretrained_kwargs(args.checkpoint, model_class=model_class))
    if args.as_loaded or args.no_zero3:
        exported = model
    else:
        optimizer = torch.optim.AdamW(model.parameters(), **testing.OPTIMIZER)
        exported, *_ = ep_ds_shim.initialize(model=model, layout=layout, optimizer=optimizer, config=config)
    report = {"rank": rank, "mode": args.mode, "raised": None, "message": None}
    gathered = count_gathers()
    if args.kill:
        point, _, victim = args.kill.partition("@")
        killer(point, int(victim), rank)
    started = time.monotonic()
    try:
        if args.mode == "export":
            ep_ds_shim.save_pretrained(exported, args.target, max_shard_size=args.max_shard_size)
        elif args.mode == "compare":
            compare(exported, args.target, args.max_shard_size, report)
        elif args.mode == "memory":
            memory(exported, args.target, args.max_shard_size, report)
        elif args.mode == "one-rank":
            if rank == 0:
                ep_ds_shim.save_pretrained(exported, args.target, max_shard_size=args.max_shard_size)
            else:
                dist.barrier()
        elif args.mode == "one-rank-verify":
            if rank == 0:
                ep_ds_shim.verify_expert_integrity(exported)
            else:
                dist.barrier()
        elif args.mode == "bad-targets":
            for name, target in (("file", args.target), ("unwritable", os.path.join(args.target, "model"))):
                try:
                    ep_ds_shim.save_pretrained(exported, target, max_shard_size=args.max_shard_size)
                    report[name] = {"raised": None}
                except Exception as error:  # noqa: BLE001 - recorded for the test
                    report[name] = {"raised": type(error).__name__, "message": str(error)}
        elif args.mode == "one-rank-initialize":  # with --as-loaded: the hand-over itself on rank 0 only
            if rank == 0:
                ep_ds_shim.initialize(model=model, layout=layout, config=config,
                                      optimizer=torch.optim.AdamW(model.parameters(), **testing.OPTIMIZER))
            else:
                dist.barrier()
        elif args.mode == "rank-exits":
            if rank == 1:
                report["exited"] = True
            else:
                ep_ds_shim.save_pretrained(exported, args.target, max_shard_size=args.max_shard_size)
        else:
            raise SystemExit(f"unknown mode {args.mode}")
    except Exception as error:  # noqa: BLE001 - recorded for the test
        report["raised"] = type(error).__name__
        report["message"] = str(error)
    report["seconds"] = time.monotonic() - started
    report["gathered"] = gathered["n"]
    testing.write_report(args.report, report, rank=rank)
    if report["raised"]:
        sys.exit(1)
    if args.mode != "rank-exits":
        dist.barrier()
        dist.destroy_process_group()


def compare(engine, target: str, max_shard_size, report: dict) -> None:
    """The streaming export, then the previous implementation's gather-to-rank-0 export as the reference."""
    import ep_ds_shim
    from ep_ds_shim.training.export import gather_full_state_dict, single_process_save
    from ep_ds_shim.training.record import unwrap

    ep_ds_shim.save_pretrained(engine, os.path.join(target, "stream"), max_shard_size=max_shard_size)
    model = unwrap(engine)
    full = gather_full_state_dict(engine)
    if full is not None:
        with single_process_save(model):
            type(model).save_pretrained(model, os.path.join(target, "reference"), state_dict=full,
                                        max_shard_size=max_shard_size)
        # what the previous implementation then stated in the index: the exported model's parameter count
        index = os.path.join(target, "reference", "model.safetensors.index.json")
        if os.path.exists(index):
            data = json.loads(open(index).read())
            names = {name for name, _ in model.named_parameters()}
            data["metadata"]["total_parameters"] = sum(full[n].numel() for n in names if n in full)
            open(index, "w").write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    dist.barrier()


def memory(engine, target: str, max_shard_size, report: dict) -> None:
    """Peak RSS growth of this rank during the export, after a warm-up export (first-use imports and buffers)."""
    from huggingface_hub.serialization._base import parse_size_to_int

    import ep_ds_shim
    from ep_ds_shim.training.export.plan import build_plan
    from ep_ds_shim.training.record import record_of, unwrap

    ep_ds_shim.save_pretrained(engine, target + "-warmup", max_shard_size=max_shard_size)
    plan = build_plan(unwrap(engine), record_of(engine), max_shard_size=max_shard_size, variant=None,
                      save_original_format=True)
    release_memory()
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # the kernel's peak RSS (VmHWM) starts again from the current RSS
    before = status_kb()["VmRSS"]
    ep_ds_shim.save_pretrained(engine, target, max_shard_size=max_shard_size)
    report["growth_bytes"] = (status_kb()["VmHWM"] - before) * 1024
    report["max_shard_size"] = parse_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    report["largest_tensor"] = max(entry.nbytes for entry in plan.entries.values())
    report["largest_unit"] = plan.largest_unit()
    report["model_bytes"] = plan.total_size
    report["shards"] = len(plan.shards)


def status_kb() -> dict:
    with open("/proc/self/status") as handle:
        return {line.split(":")[0]: int(line.split()[1]) for line in handle if line.startswith(("VmRSS", "VmHWM"))}


def release_memory() -> None:
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(sys.argv[1:])
