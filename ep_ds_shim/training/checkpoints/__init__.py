"""Resumable DeepSpeed checkpoints of an EP model: nothing half-written is ever loaded, and a run moves to another
DP x EP layout (world size or EP size) with its optimizer.

- `save.py`: `engine.save_checkpoint`. DeepSpeed writes every rank's files under a hidden staging tag; once all are on
  disk, global rank 0 writes the checkpoint's JSON record (`manifest.py`: tag, step, layout, model, partitions, each
  rank's files' SHA-256), puts the tag in place (write-then-swap) and only then writes `latest`.
- `load.py`: `engine.load_checkpoint` / `ep_ds_shim.load_checkpoint`. The ranks agree on the tag, step and record;
  what cannot be resumed is refused on every rank (`plan.py`); the layout that wrote it loads with DeepSpeed's own
  load after each rank checks its files, another layout through DeepSpeed's universal format (`universal.py`,
  converted by every rank of the resuming job, cached next to the checkpoint).

Nothing here unpickles: records are JSON, and DeepSpeed's optimizer states are read with `weights_only=True`
(`sources.py`). DeepSpeed's own load still unpickles its files (docs/checkpoints.md).
"""

from __future__ import annotations

from .load import load_checkpoint as load_engine_checkpoint
from .save import save_checkpoint as save_engine_checkpoint

__all__ = ["load_engine_checkpoint", "save_engine_checkpoint", "load_checkpoint"]


def load_checkpoint(engine, load_dir, tag=None, **kwargs):
    """Resume an EP engine from a DeepSpeed checkpoint, on every rank, in any DP x EP layout: the same as
    ``engine.load_checkpoint(load_dir, tag, **kwargs)`` once the engine came from the library's hand-over
    (`ep_ds_shim.initialize`, `supply_deepspeed_groups`, `EPTrainer`).

    Keyword arguments are DeepSpeed's (``load_module_strict``, ``load_lr_scheduler_states``, ``load_module_only``),
    plus ``conversion_dir``: where a conversion for another layout is written when the checkpoint's own directory is
    read-only (default: next to the checkpoint's files). Returns DeepSpeed's ``(load_path, client_state)``.
    """
    from ...errors import EpShimError
    from ..record import record_of

    record = record_of(engine)
    if "deepspeed hand-over" not in record.checked or not hasattr(engine, "optimizer"):
        raise EpShimError(
            "ep_ds_shim.load_checkpoint needs the DeepSpeed engine returned by ep_ds_shim.initialize (or by "
            "deepspeed.initialize inside ep_ds_shim.supply_deepspeed_groups, or EPTrainer's), not the model")
    return engine.load_checkpoint(load_dir, tag, **kwargs)
