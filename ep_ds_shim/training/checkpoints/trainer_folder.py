"""A Trainer checkpoint folder (``checkpoint-<step>``) that appears only once every rank has written its part.

The Trainer writes a checkpoint straight into ``<output_dir>/checkpoint-<step>``: the model, then each rank's
DeepSpeed states, RNG state and the trainer state. A rank that dies in between leaves a folder that
`get_last_checkpoint` (``resume_from_checkpoint=True``) picks as the newest. Here the Trainer's own
`_save_checkpoint` runs with its output directory pointed at a hidden staging folder
(``.checkpoint-<step>.incoming-<id>``); when every rank has returned, global rank 0 flushes it and renames it into
place (swapping out a folder of the same step), and only then are older checkpoints rotated.
"""

from __future__ import annotations

import os
import uuid

import torch.distributed as dist

from ...errors import CheckpointIntegrityError
from . import durable
from .agree import AFTER_WRITE_TIMEOUT, agree, described
from .save import STAGING


def save_trainer_checkpoint(trainer, save, model, trial) -> None:
    """Run the Trainer's `save(model, trial)` (its `_save_checkpoint`) into a staging folder, then put it in place."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

    run_dir = trainer._get_output_dir(trial=trial)
    folder = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    final = os.path.join(run_dir, folder)
    what = f"the Trainer's checkpoint {final}"
    begun = agree("trainer_checkpoint_begin", None, what=what, error=CheckpointIntegrityError,
                  payload={"token": uuid.uuid4().hex[:12]})
    token = begun[0]["token"]
    staging_root = os.path.join(run_dir, f".{folder}.incoming-{token}")  # the Trainer writes <staging_root>/<folder>
    staged = os.path.join(staging_root, folder)
    problem = None
    trainer._get_output_dir = lambda trial=None: staging_root  # this call only (an attribute of this instance)
    try:
        save(model, trial)
        best = trainer.state.best_model_checkpoint
        if best is not None and os.path.abspath(best) == os.path.abspath(staged):
            # it is this checkpoint: record where it will be, as the Trainer would have
            trainer.state.best_model_checkpoint = final
            if trainer.args.should_save:
                from transformers.trainer import TRAINER_STATE_NAME

                trainer.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
    except Exception as error:  # noqa: BLE001 - every rank raises it below
        problem = described(error)
    finally:
        del trainer._get_output_dir
    agree("trainer_checkpoint_written", problem, what=what, error=CheckpointIntegrityError,
          prefix=f"{what} was not written on every rank; nothing was put in place. ", timeout=AFTER_WRITE_TIMEOUT)
    problem = None
    if dist.get_rank() == 0:
        try:
            durable.fsync_tree(staged)
            durable.put_in_place(staged, final, outgoing=os.path.join(staging_root, f"{folder}.outgoing"))
            durable.remove_tree(staging_root)
            for name in os.listdir(run_dir):  # staging folders of saves that never finished
                if STAGING.match(name) and name.startswith(f".{PREFIX_CHECKPOINT_DIR}-"):
                    durable.remove_tree(os.path.join(run_dir, name))
        except Exception as error:  # noqa: BLE001 - every rank raises it below
            problem = described(error)
    agree("trainer_checkpoint_commit", problem, what=what, error=CheckpointIntegrityError,
          prefix=f"{what}: every rank wrote its part, but putting it in place failed: ", timeout=AFTER_WRITE_TIMEOUT)
    if trainer.args.should_save:
        rotate_checkpoints(output_dir=run_dir, save_total_limit=trainer.args.save_total_limit,
                           best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=True)
