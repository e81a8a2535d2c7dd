"""One rank of DeepSpeed AutoEP, as shipped (the other side of the shim-vs-AutoEP comparison; run.py starts it).

    torchrun --nproc_per_node N benchmarks/autoep_worker.py <checkpoint> <report-{rank}.json> [--steps K]
             [--load plain|zinit] [--batch same|split] [--family qwen3_moe] [--sequences G]

The model is built the way AutoEP's documentation and tests build it: a plain `from_pretrained` on every rank
(`--load plain`, the default: every rank loads the whole model), or with an `HfDeepSpeedConfig` alive so it loads
under `zero.Init` (`--load zinit`). Then `deepspeed.initialize` with the config section
`"expert_parallel": {"enabled": true, "autoep_size": <ranks>, "preset_model": <family>}`, which replaces the MoE
layers and partitions the experts; nothing of AutoEP is patched. Same DeepSpeed config otherwise, same optimizer
(torch AdamW), same steps and global batches (--sequences) as the shim's side and the reference. Batches:
`--batch split` gives each rank its own slice of the step's global batch (AutoEP's own data-parallel use, as
ep-ds-shim 0.3 trains); `--batch same` gives every rank all of it, as ep-ds-shim 0.2's EP group got it (the same
work per rank; AutoEP then routes duplicated tokens). The loss reported is the mean over ranks (what the
data-parallel step trains on); the ZeRO-3 state each rank holds is read after the steps. A failure is
reported with its message and the innermost DeepSpeed/transformers frame.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def where(exc) -> str | None:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "site-packages" in f.filename]
    if not frames:
        return None
    frame = frames[-1]
    return f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno} ({frame.name})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("report")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--load", default="plain", choices=["plain", "zinit"])
    parser.add_argument("--batch", default="same", choices=["same", "split"])
    parser.add_argument("--family", default="qwen3_moe")
    parser.add_argument("--sequences", type=int, default=None, help="the global batch (default: common.MICRO)")
    parser.add_argument("--probe-export", action="store_true",
                        help="after the steps, try DeepSpeed's consolidated 16-bit save (records the outcome)")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    import deepspeed
    import torch
    import torch.distributed as dist
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from ep_ds_shim.testing import write_report

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sequences = args.sequences or common.MICRO
    config = common.ds_config(autoep_size=world, family=args.family,
                              micro=common.per_rank_sequences(sequences, world, args.batch))
    common.warm_imports(args.checkpoint)
    report = {"rank": rank, "world": world, "transformers": transformers.__version__, "deepspeed": deepspeed.__version__,
              "load_mode": args.load, "batch_mode": args.batch, "sequences": sequences, "ds_config": config,
              "phase": "load"}
    try:
        keep = HfDeepSpeedConfig(config) if args.load == "zinit" else None  # noqa: F841

        def prewarmed_barrier():
            common.prewarmed_barrier(report, args.checkpoint, rank, dist.barrier)

        def phase(name, fn, barrier):
            return common.measure(report, name, fn, barrier)

        model = phase("load", lambda: AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32),
                      prewarmed_barrier)
        model.train()
        report["phase"] = "initialize"
        optimizer = common.adamw(model.parameters())
        engine, *_ = phase("initialize", lambda: deepspeed.initialize(model=model, optimizer=optimizer, config=config),
                           dist.barrier)
        from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

        report["autoep_layers"] = sum(isinstance(m, AutoEPMoELayer) for m in engine.module.modules())
        report["dp_world_size"] = engine.dp_world_size
        report["phase"] = "steps"
        report["steps"] = common.timed_steps(
            engine, args.steps, engine.module.config.vocab_size, dist.barrier, rank=rank, sequences=sequences,
            slice_batch=lambda batch: common.rank_batch(batch, rank, world, args.batch),
            step_loss=lambda loss: common.mean_over_ranks(loss, world))
        report["zero3"] = common.zero3_state(engine, world)
        if args.probe_export:
            report["phase"] = "export probe"
            try:
                engine.save_16bit_model("/nonexistent-autoep-export-probe")
                report["export_probe"] = "save_16bit_model returned"
            except Exception as exc:  # noqa: BLE001 - recorded, it is what a user gets
                report["export_probe"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]} @ {where(exc)}"
        report["status"] = "works"
    except Exception as exc:  # noqa: BLE001 - the failure is the measurement
        report["status"] = "fails"
        report["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        report["error_where"] = where(exc)
        write_report(args.report, report, rank=rank)
        print(f"[rank {rank}] AutoEP fails in {report['phase']}: {report['error']} @ {report['error_where']}",
              file=sys.stderr, flush=True)
        os._exit(3)  # a failed collective set-up would otherwise hang in destroy_process_group
    write_report(args.report, report, rank=rank)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    common.run_worker(main)
