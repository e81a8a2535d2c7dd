"""EP + DeepSpeed ZeRO-3 through the transformers `Trainer` (`TrainingArguments(deepspeed=...)`).

    torchrun --nproc_per_node 2 examples/launchers/train_trainer.py
    deepspeed --num_gpus 8 examples/launchers/train_trainer.py --device cuda --model-dir <ckpt>

`TrainingArguments(deepspeed=...)` signals ZeRO-3, so the model is loaded inside `ep_zero3_compat()` after it.
`ep_ds_shim.EPTrainer` feeds every rank its own batches (`layout.sampler`) and makes the Trainer's
`deepspeed.initialize` the library's hand-over. The reference is the same few steps in a plain single-process run
on every rank's batches together (a subprocess of each rank, before anything distributed starts); losses are
compared step by step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import parse_args  # noqa: E402

STEPS = 3
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def dataset(vocab_size: int, world: int):
    """STEPS x world x 2 sequences: step s of rank r trains on rows [(s*world+r)*2, +2)."""
    from ep_ds_shim import testing

    rows = []
    for index in range(STEPS * world):
        rows.extend({"input_ids": x, "labels": x} for x in testing.batch_for(index, vocab_size=vocab_size))
    return rows


def training_arguments(output_dir, *, deepspeed=None, batch_size=2):
    from transformers import TrainingArguments

    from ep_ds_shim import testing

    return TrainingArguments(
        output_dir=output_dir, deepspeed=deepspeed, per_device_train_batch_size=batch_size, max_steps=STEPS,
        learning_rate=testing.OPTIMIZER["lr"], adam_epsilon=testing.OPTIMIZER["eps"],
        weight_decay=testing.OPTIMIZER["weight_decay"], max_grad_norm=1.0, lr_scheduler_type="constant",
        logging_steps=1, report_to=[], save_strategy="no", seed=0, dataloader_drop_last=True,
    )


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def reference(path: str, world: int, out: str) -> None:
    """Single process, no DeepSpeed: every rank's batch concatenated makes one step's batch."""
    from transformers import AutoModelForCausalLM, Trainer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = dataset(model.config.vocab_size, world)
    with tempfile.TemporaryDirectory() as tmp:
        args = training_arguments(tmp, batch_size=2 * world)
        args.train_sampling_strategy = "sequential"
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
    with open(out, "w") as handle:
        json.dump(losses(trainer), handle)


def load(path, layout):
    """The EP load, inside the block (ZeRO-3 signalled or not: the Trainer makes the model DeepSpeed-ready)."""
    import ep_ds_shim
    from transformers import AutoModelForCausalLM

    with ep_ds_shim.ep_zero3_compat():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **layout.from_pretrained_kwargs(path))


def main(argv=None) -> int:
    args = parse_args([a for a in (argv or sys.argv[1:]) if a != "--reference-only"], __doc__)
    from ep_ds_shim import testing

    path = args.model_dir or str(testing.build_tiny_moe(os.path.join("build", "examples", f"tiny-{args.family}"), args.family))
    world = int(os.environ.get("WORLD_SIZE_FOR_REFERENCE") or os.environ.get("WORLD_SIZE", "1"))
    if "--reference-only" in (argv or sys.argv[1:]):
        reference(path, world, args.json)
        return 0

    ref_losses = None
    if not args.no_reference:
        env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
        with tempfile.TemporaryDirectory() as scratch:  # each rank's own reference run; nothing left behind
            ref_file = os.path.join(scratch, "reference.json")
            subprocess.run([sys.executable, os.path.abspath(__file__), "--reference-only", "--model-dir", path,
                            "--json", ref_file, *(["--ep-size", str(args.ep_size)] if args.ep_size else [])],
                           env={**env, "WORLD_SIZE_FOR_REFERENCE": str(world)}, check=True)
            with open(ref_file) as handle:
                ref_losses = json.load(handle)

    import deepspeed
    import torch.distributed as dist

    import ep_ds_shim
    from ep_ds_shim import EPTrainer

    deepspeed.init_distributed(dist_backend="nccl" if args.device == "cuda" else "gloo")
    layout = ep_ds_shim.DPxEPLayout(args.ep_size or dist.get_world_size())
    ds_config = {
        # no train_batch_size: DeepSpeed derives it over every rank (the Trainer's "auto" would count accelerate's
        # processes, one for DeepSpeed on CPU)
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_optimization": {"stage": 3}, "steps_per_print": 10**9,
    }
    with tempfile.TemporaryDirectory() as tmp:
        if args.load_first:  # the common order: load, then TrainingArguments(deepspeed=...) signals ZeRO-3
            model = load(path, layout)
            training_args = training_arguments(tmp, deepspeed=ds_config)
        else:
            training_args = training_arguments(tmp, deepspeed=ds_config)  # signals ZeRO-3
            model = load(path, layout)
        training_args.train_sampling_strategy = "sequential"
        rows = dataset(model.config.vocab_size, layout.world_size)
        trainer = EPTrainer(model=model, args=training_args, train_dataset=rows, ep_layout=layout)
        if trainer.accelerator.num_processes != dist.get_world_size():
            # accelerate reports num_processes=1 for DeepSpeed on CPU; the Trainer's cross-device token count
            # then scales the loss by num_processes // tp_size = 0. Every batch here has the same number of tokens,
            # so letting the model average over its own tokens (DeepSpeed then averages over ranks) is exact.
            trainer.model_accepts_loss_kwargs = False
        trainer.train()
    got = losses(trainer)
    rank = dist.get_rank()
    result = {"rank": rank, "launcher": "Trainer", "layout": repr(layout), "losses": got, "reference": ref_losses}
    if ref_losses is not None:
        result["max_loss_diff"] = max(abs(a - b) for a, b in zip(got, ref_losses)) if len(got) == len(ref_losses) else None
        result["ok"] = result["max_loss_diff"] is not None and result["max_loss_diff"] <= max(args.tolerance, 1e-4)
        print(f"[rank {rank}] Trainer: {layout}: losses {['%.6f' % v for v in got]} vs reference "
              f"{['%.6f' % v for v in ref_losses]} -> {'MATCH' if result['ok'] else 'MISMATCH'}")
    if args.json:
        with open(args.json.format(rank=rank), "w") as handle:
            json.dump(result, handle, indent=1)
    dist.barrier()
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
