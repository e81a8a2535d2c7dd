"""One rank of accelerate's save_state / load_state across layouts (run by `accelerate launch` from
test_checkpoints.py).

    worker_accelerate_resume.py <checkpoint> <state_dir> <report.json> [--load] [--start N] --steps M

Trains steps [start, start + M) through `Accelerator.prepare` (inside `supply_deepspeed_groups`, dp x ep=2), each
rank on its own batch (`oracle.run_batch`), with the oracle's LR schedule; without --load it saves the state at the
end (`save_state`), with --load it restores it first (`load_state`: the engine's load_checkpoint).
"""

from __future__ import annotations

import argparse
import os

import torch

TOTAL_STEPS = 6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("state_dir")
    parser.add_argument("report")
    parser.add_argument("--load", action="store_true")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args()

    import torch.distributed as dist
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    import ep_ds_shim
    from ep_ds_shim import testing
    from ep_ds_shim.testing import oracle

    accelerator = Accelerator()
    world, rank = dist.get_world_size(), dist.get_rank()
    layout = ep_ds_shim.DPxEPLayout(2)
    with ep_ds_shim.ep_zero3_compat():
        model = AutoModelForCausalLM.from_pretrained(args.path, dtype=torch.float32,
                                                     **layout.from_pretrained_kwargs(args.path))
    optimizer = torch.optim.AdamW(model.parameters(), **testing.OPTIMIZER)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, oracle.schedule(TOTAL_STEPS))
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    ds_config["train_micro_batch_size_per_gpu"] = 2
    ds_config["train_batch_size"] = 2 * world  # accelerate counts one process for DeepSpeed on CPU
    with ep_ds_shim.supply_deepspeed_groups(layout):
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    report = {"rank": rank, "world": world}
    if args.load:
        accelerator.load_state(args.state_dir)
        report["step_after_load"] = model.global_steps  # `model` is the DeepSpeed engine here
    losses = []
    for step in range(args.start, args.start + args.steps):
        batch = oracle.run_batch(step, 0, rank, grad_accum=1, world=world)
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)  # DeepSpeed's backward and step (and the schedule's)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss))
    report["losses"] = losses
    if not args.load:
        accelerator.save_state(args.state_dir)
    testing.write_report(args.report, report, rank=rank)
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
