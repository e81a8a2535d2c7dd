"""One rank of the checkpoint benchmark (the orchestrator is run.py, section "checkpoint").

    torchrun --nproc_per_node N benchmarks/checkpoint_worker.py <mode> <checkpoint> <report-{rank}.json> <dir>
        [--ep-size E]

modes:
  save     EP load under ZeRO-3, ep_ds_shim.initialize with AdamW, one training step (Adam's moments exist), then
           DeepSpeed's own save_checkpoint (the baseline) and engine.save_checkpoint(dir), twice each in ABBA order:
           seconds and peak RSS of each (the latter adds flushing and digesting every file, the record, the swap).
  resume   EP load, initialize, then the resume of dir's latest checkpoint: in the layout that wrote it, DeepSpeed's
           own load after each rank checks its files (the baseline); in another layout, the conversion to DeepSpeed's
           universal format timed on its own (every rank converts a share), then load_checkpoint (it finds the
           conversion, checks its share of it, and DeepSpeed's universal ZeRO-3 load runs). One training step after,
           to show training goes on.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def tree_bytes(path) -> int:
    return sum(entry.stat().st_size for entry in Path(path).rglob("*") if entry.is_file())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["save", "resume"])
    parser.add_argument("checkpoint")
    parser.add_argument("report")
    parser.add_argument("directory")
    parser.add_argument("--ep-size", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    import ep_ds_shim
    from ep_ds_shim.testing import write_report
    from ep_ds_shim.training.checkpoints import manifest, universal

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = ep_ds_shim.DPxEPLayout(args.ep_size)
    path = args.checkpoint
    common.warm_imports(path)
    hf = HfDeepSpeedConfig(common.ds_config())  # noqa: F841 - ZeRO-3 signalled, as a DeepSpeed user has it
    report = {"rank": rank, "world": world, "mode": args.mode, "ep_size": layout.ep_size, "dp_size": layout.dp_size}
    with ep_ds_shim.ep_zero3_compat():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **layout.from_pretrained_kwargs(path))
    engine, *_ = ep_ds_shim.initialize(model=model, layout=layout, optimizer=common.adamw(model.parameters()),
                                       config=common.ds_config())
    vocab = model.config.vocab_size

    def train_step():
        batch = common.step_batch(engine.global_steps, vocab)
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        return float(loss)

    if args.mode == "save":
        report["loss"] = train_step()
        common.release_memory()
        # the baseline: DeepSpeed's own save_checkpoint of the same state (no staging, digests, record or swap), in
        # ABBA order (the first save of a job meets another page-cache state than the next); the extra copies go
        deepspeed_save = lambda directory: type(engine).save_checkpoint(engine, directory)  # noqa: E731
        order = [("deepspeed_save", deepspeed_save, "-deepspeed-1"), ("save", engine.save_checkpoint, ""),
                 ("save_again", engine.save_checkpoint, "-again"), ("deepspeed_save_again", deepspeed_save, "-deepspeed-2")]
        for name, save, suffix in order:
            directory = args.directory.rstrip("/") + suffix
            common.release_memory()
            common.measure(report, name, lambda: save(directory), dist.barrier)
            dist.barrier()
            if suffix and rank == 0:
                shutil.rmtree(directory, ignore_errors=True)
        if rank == 0:
            report["checkpoint_bytes"] = tree_bytes(os.path.join(args.directory, f"global_step{engine.global_steps}"))
    else:
        with open(os.path.join(args.directory, "latest")) as handle:
            tag_dir = os.path.join(args.directory, handle.read().strip())
        saved = manifest.read(tag_dir)
        report["saved_layout"] = saved["layout"]
        common.release_memory()
        if saved["layout"]["world_size"] != world or saved["layout"]["ep_size"] != layout.ep_size:
            common.measure(report, "convert", lambda: universal.ensure(saved, tag_dir, tag_dir), dist.barrier)
            if rank == 0:
                report["universal_bytes"] = tree_bytes(os.path.join(tag_dir, universal.FOLDER))
            common.release_memory()
        common.measure(report, "load", lambda: engine.load_checkpoint(args.directory), dist.barrier)
        report["step"] = engine.global_steps
        report["loss_after"] = train_step()
    write_report(args.report, report, rank=rank)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    common.run_worker(main)
