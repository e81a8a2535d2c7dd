"""One rank of the Trainer save / resume checks (run by torchrun from test_saving.py); also the single-process
reference when run without a launcher (`--reference`).

    worker_trainer_save.py <checkpoint> <output_dir> <report.json> [--stage S] [--trainer ep|plain]
                           [--save-only-model] [--resume-from DIR] [--reference] [--data-world N]
                           [--kill-at-checkpoint STEP]

Trains STEPS steps with `save_steps=2` (checkpoints at steps 2 and 4) and then `trainer.save_model(output_dir +
"/final")`. "ep" is `ep_ds_shim.EPTrainer`; "plain" is transformers' own Trainer with `train()` inside
`supply_deepspeed_groups` (the save paths it reaches are the engine's). Saving is GPU-like: on CPU accelerate sees
one process under DeepSpeed, so every rank would believe it is the one that saves; here only global rank 0 does,
as on GPUs, which is what exposes rank-0-only save paths.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback

import torch
import torch.distributed as dist
from transformers import TrainingArguments

STEPS = 4


class GpuLikeSaving(TrainingArguments):
    """Only global rank 0 saves, as on GPUs (defined at module level: the Trainer pickles its arguments)."""

    @property
    def should_save(self):
        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def training_arguments(output_dir, *, deepspeed=None, batch_size=2, save_only_model=False):
    from ep_ds_shim import testing

    return GpuLikeSaving(
        output_dir=output_dir, deepspeed=deepspeed, per_device_train_batch_size=batch_size, max_steps=STEPS,
        learning_rate=testing.OPTIMIZER["lr"], adam_epsilon=testing.OPTIMIZER["eps"],
        weight_decay=testing.OPTIMIZER["weight_decay"], max_grad_norm=1.0, lr_scheduler_type="linear",
        logging_steps=1, report_to=[], save_strategy="steps", save_steps=2, save_only_model=save_only_model,
        seed=0, dataloader_drop_last=True, train_sampling_strategy="sequential",
    )


def rows(vocab_size: int, world: int):
    from ep_ds_shim import testing

    out = []
    for index in range(STEPS * world):
        out.extend({"input_ids": x, "labels": x} for x in testing.batch_for(index, vocab_size=vocab_size))
    return out


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def reference(path: str, output_dir: str, report_path: str, world: int, data_world: int, resume_from=None) -> None:
    """A single process on every rank's batches together (every rank trains on its own); resuming its own checkpoint
    with `world` ranks' batches when the EP run resumes on another layout."""
    from transformers import AutoModelForCausalLM, Trainer

    # transformers' Trainer reloads a checkpoint it saved without the release's weight conversion (5.24: the fused
    # expert tensors are reported missing and keep the model's initial values), so the model is loaded from the
    # checkpoint it resumes: its experts are the checkpoint's, and the Trainer then restores the rest of its state.
    model = AutoModelForCausalLM.from_pretrained(resume_from or path, dtype=torch.float32)
    trainer = Trainer(model=model, args=training_arguments(output_dir, batch_size=2 * world),
                      train_dataset=rows(model.config.vocab_size, data_world))
    trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(os.path.join(output_dir, "final"))
    with open(report_path.format(rank=0), "w") as handle:
        json.dump({"losses": losses(trainer)}, handle)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("output_dir")
    parser.add_argument("report")
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--trainer", choices=("ep", "plain"), default="ep")
    parser.add_argument("--save-only-model", action="store_true")
    parser.add_argument("--resume-from")
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--world", type=int, default=2, help="with --reference: the ranks whose batches it trains on")
    parser.add_argument("--kill-at-checkpoint", type=int, default=None,
                        help="rank 1 SIGKILLs itself inside the Trainer's save of this step's checkpoint")
    parser.add_argument("--data-world", type=int, default=None,
                        help="the dataset holds this many ranks' batches per step (default: the job's world)")
    args = parser.parse_args()
    if args.reference:
        return reference(args.path, args.output_dir, args.report, args.world, args.data_world or args.world,
                         args.resume_from)

    import deepspeed
    from transformers import AutoModelForCausalLM, Trainer

    import ep_ds_shim

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    layout = ep_ds_shim.DPxEPLayout(2)
    ds_config = {
        # no train_batch_size: DeepSpeed derives it over every rank (the Trainer's "auto" would count accelerate's
        # processes, one for DeepSpeed on CPU)
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_optimization": {"stage": args.stage,
                                                           "stage3_gather_16bit_weights_on_model_save": True},
        "steps_per_print": 10**9,
    }
    report = {"rank": rank, "raised": None}
    try:
        training_args = training_arguments(args.output_dir, deepspeed=ds_config, save_only_model=args.save_only_model)
        with ep_ds_shim.ep_zero3_compat():
            model = AutoModelForCausalLM.from_pretrained(args.path, dtype=torch.float32,
                                                         **layout.from_pretrained_kwargs(args.path))
        data = rows(model.config.vocab_size, args.data_world or layout.world_size)
        if args.trainer == "ep":
            trainer = ep_ds_shim.EPTrainer(model=model, args=training_args, train_dataset=data, ep_layout=layout)
        else:
            trainer = Trainer(model=model, args=training_args, train_dataset=data)
        # accelerate reports one process for DeepSpeed on CPU; every batch has the same token count, so letting the
        # model average its own tokens (DeepSpeed then averages over ranks) is exact (see train_trainer.py)
        trainer.model_accepts_loss_kwargs = False
        if args.kill_at_checkpoint and rank == 1:  # dies in that checkpoint, after its DeepSpeed files
            original_rng_save = trainer._save_rng_state

            def save_rng_state(output_dir):
                if trainer.state.global_step == args.kill_at_checkpoint:
                    os.kill(os.getpid(), signal.SIGKILL)
                return original_rng_save(output_dir)

            trainer._save_rng_state = save_rng_state
        if args.trainer == "ep":
            trainer.train(resume_from_checkpoint=args.resume_from)
        else:
            with ep_ds_shim.supply_deepspeed_groups(layout):
                trainer.train(resume_from_checkpoint=args.resume_from)
        trainer.save_model(os.path.join(args.output_dir, "final"))
        report["losses"] = losses(trainer)
    except Exception as error:  # noqa: BLE001 - recorded for the test
        report["raised"] = type(error).__name__
        report["message"] = str(error)
        report["trace"] = traceback.format_exc()[-3000:]
    with open(args.report.format(rank=rank), "w") as handle:
        json.dump(report, handle, indent=1)
    if report["raised"]:
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
