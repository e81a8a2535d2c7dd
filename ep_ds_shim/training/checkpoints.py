"""Resumable DeepSpeed checkpoints of an EP model: which layout wrote them, and refusing to resume under another.

DeepSpeed's `save_checkpoint` writes one model-states file per EP rank (the `mpu`'s model-parallel rank) and the
ZeRO partitions of its data-parallel groups; `load_checkpoint` in the same layout continues exactly. Under another
layout the files do not fit: DeepSpeed then fails with errors that differ from rank to rank, some empty, some about
Megatron keys (docs/design.md, "Saving"). So the layout goes into the checkpoint (`client_state`), and a resume
compares it first, on every rank, and all ranks raise one error that names the way across layouts: the export.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..distributed import exchange
from ..errors import CheckpointLayoutError
from .record import EPModelRecord

RECORD_KEY = "ep_ds_shim_layout"

_ACROSS_LAYOUTS = (
    "DeepSpeed checkpoints of an EP model hold each EP rank's experts and the ZeRO partitions of the layout that "
    "wrote them; they cannot be resharded. To continue on another layout: in the layout that wrote it, export with "
    "ep_ds_shim.save_pretrained(engine, dir) (or resume there and export), then load that directory with the new "
    "layout's from_pretrained_kwargs and start a new DeepSpeed run (the optimizer state starts afresh)."
)


def layout_record(engine, record: EPModelRecord) -> dict:
    layout = record.layout
    return {
        "world_size": dist.get_world_size(), "dp_size": layout.dp_size, "ep_size": record.ep_size,
        "zero_stage": engine.zero_optimization_stage(), "expert_rows": record.expert_rows,
    }


def check_resume(engine, record: EPModelRecord, load_dir, tag, *, load_module_only: bool) -> None:
    """Before DeepSpeed loads: this job's layout is the one that wrote the checkpoint. Every rank looks at its own
    model-states file and all ranks raise the same `CheckpointLayoutError` if any of them found a mismatch."""
    problem = None
    try:
        problem = _problem(engine, record, load_dir, tag, load_module_only)
    except Exception as error:  # noqa: BLE001 - unreadable checkpoint: say so on every rank
        problem = f"could not read the checkpoint's layout ({type(error).__name__}: {error})"
    verdicts = exchange("checkpoint_layout", {"problem": problem}, what="the resume layout check")
    bad = {rank: verdict["problem"] for rank, verdict in verdicts.items() if verdict["problem"]}
    if bad:
        rank, message = next(iter(sorted(bad.items())))
        raise CheckpointLayoutError(
            f"cannot resume from {load_dir!r} (tag {tag}) in this job (dp={record.layout.dp_size} x "
            f"ep={record.ep_size}, world {dist.get_world_size()}): rank {rank}: {message}. {_ACROSS_LAYOUTS}"
        )


def _problem(engine, record: EPModelRecord, load_dir, tag, load_module_only: bool) -> str | None:
    if tag is None:
        latest = os.path.join(load_dir, "latest")
        if not os.path.isfile(latest):
            return None  # DeepSpeed itself reports a missing checkpoint ("latest" not found) and loads nothing
        with open(latest) as handle:
            tag = handle.read().strip()
    path = engine._get_ckpt_name(load_dir, tag)  # DeepSpeed's own name for this rank's model-states file
    if not os.path.exists(path):
        folder = os.path.dirname(path)
        found = sorted(f for f in os.listdir(folder) if f.endswith("model_states.pt")) if os.path.isdir(folder) else []
        return f"it has no {os.path.basename(path)} for this rank (found {found or 'nothing'})"
    saved = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    written = saved.get(RECORD_KEY) or {"ep_size": saved.get("mp_world_size"), "dp_size": saved.get("dp_world_size")}
    here = layout_record(engine, record)
    if written.get("ep_size") != here["ep_size"]:
        return f"it was written with ep={written.get('ep_size')}"
    if "expert_rows" in written and written["expert_rows"] != here["expert_rows"]:
        return "its expert tensors are not this model's"
    if written.get("dp_size") != here["dp_size"] and not load_module_only:
        return (f"it was written with dp={written.get('dp_size')} x ep={written.get('ep_size')} (its optimizer state "
                "is partitioned for that; load_module_only=True would keep only the weights)")
    return None
