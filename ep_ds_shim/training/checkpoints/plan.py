"""Whether this engine can resume a checkpoint, and how: in place (the layout that wrote it: DeepSpeed's own load) or
through the universal conversion (another world size or EP size). What cannot be reached is refused, naming what
differs: another ZeRO stage, another model, another optimizer."""

from __future__ import annotations

import torch.distributed as dist

from . import describe
from .resolve import Problem

NATIVE, UNIVERSAL = "native", "universal"


def layout_of(record) -> dict:
    return {"world_size": dist.get_world_size(), "dp_size": record.layout.dp_size, "ep_size": record.ep_size}


def plan(engine, record, saved: dict, *, module_only: bool) -> str:
    """NATIVE or UNIVERSAL; raises `Problem("layout", ...)`."""
    stage = engine.zero_optimization_stage()
    if saved["zero_stage"] != stage:
        raise Problem("layout", f"it was written at ZeRO stage {saved['zero_stage']}, this engine runs stage {stage}")
    model_difference = _model_difference(saved["model"], describe.model(engine, record))
    if model_difference:
        raise Problem("layout", f"it holds another model: {model_difference}")
    # An EP size that does not divide the experts never gets here: the model does not load with it
    # (`loading/request.py`), and the model is the checkpoint's (above).
    groups = len(engine.optimizer.optimizer.param_groups)
    if not module_only and saved["optimizer"]["param_groups"] != groups:
        raise Problem("layout", (f"its optimizer has {saved['optimizer']['param_groups']} parameter groups, this "
                                 f"engine's has {groups}: build the optimizer the way the run that saved it did"))
    here = layout_of(record)
    if saved["layout"] == here and not module_only:
        return NATIVE
    if saved.get("nvme_offload"):
        raise Problem("layout", (
            f"it was written with NVMe optimizer offload at dp={saved['layout']['dp_size']} x "
            f"ep={saved['layout']['ep_size']}, which ep-ds-shim cannot convert to another layout"
            + (" (nor load weights-only)" if module_only else "") + "; resume it in that layout"))
    return UNIVERSAL


def _model_difference(saved: dict, here: dict) -> str | None:
    saved_params, here_params = saved["parameters"], here["parameters"]
    missing = sorted(set(saved_params) - set(here_params))
    extra = sorted(set(here_params) - set(saved_params))
    reshaped = sorted(name for name in set(saved_params) & set(here_params) if saved_params[name] != here_params[name])
    parts = []
    if reshaped:
        name = reshaped[0]
        parts.append(f"{len(reshaped)} parameters have other shapes (e.g. {name}: {saved_params[name]} in the "
                     f"checkpoint, {here_params[name]} here)")
    if missing:
        parts.append(f"{len(missing)} of its parameters are not in this model (e.g. {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} parameters of this model are not in it (e.g. {extra[0]})")
    return "; ".join(parts) or None
