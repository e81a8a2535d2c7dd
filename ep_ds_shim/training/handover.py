"""Handing an EP model to DeepSpeed: what every library entry point does around `deepspeed.initialize`.

`ep_ds_shim.initialize`, `supply_deepspeed_groups` (accelerate, the Trainer, the zero-edit runner) and `EPTrainer`
all go through `before` and `after`, so the checks cannot drift apart:

before: a verified DeepSpeed, a release whose EP trains correctly, a model loaded inside the block and made
    DeepSpeed-ready (also when ZeRO-3 was not signalled at load: the Trainer's load-then-configure order), a layout
    whose EP groups are the ones the model was loaded with, and ranks that agree on all of it.
after: DeepSpeed's groups are the DP x EP ones, every expert shard is intact, and the engine's save / checkpoint
    paths are made EP-aware (`engine_paths`).
"""

from __future__ import annotations

import json
import os


from ..errors import DeepSpeedGroupsError
from ..releases.support import check_deepspeed, refuse_training_if_defective, transformers_version
from . import agreement, engine_paths, guard
from .adoption import make_deepspeed_ready, repoint_optimizer
from .layout import DPxEPLayout
from .record import EPModelRecord, record_of

_auto_layouts: dict[int, DPxEPLayout] = {}


def layout_for(record: EPModelRecord, layout: DPxEPLayout | None) -> DPxEPLayout:
    """`layout`, or one built (once per EP size; a collective) to match the loaded model; its EP group must be the
    one the model was loaded with."""
    if layout is None:
        layout = _auto_layouts.get(record.ep_size)
        if layout is None:
            layout = _auto_layouts[record.ep_size] = DPxEPLayout(record.ep_size)
    if tuple(layout.ep_ranks) != tuple(record.ep_ranks):
        raise DeepSpeedGroupsError(
            f"the model was loaded with expert-parallel group {list(record.ep_ranks)}, but the layout's EP group for "
            f"this rank is {list(layout.ep_ranks)}; load with layout.from_pretrained_kwargs(...) of the same layout."
        )
    return layout


def zero_stage_of(config) -> int | None:
    """The ZeRO stage a DeepSpeed config (dict or JSON path) asks for; None when it cannot be read here."""
    if isinstance(config, (str, os.PathLike)) and os.path.exists(config):
        with open(config) as handle:
            config = json.load(handle)
    if isinstance(config, dict):
        return int((config.get("zero_optimization") or {}).get("stage", 0))
    return None


def before(model, layout: DPxEPLayout | None, config, *, optimizer=None, allow_unverified: bool = False) -> DPxEPLayout:
    """Everything checked and prepared before `deepspeed.initialize` runs; returns the layout to pass as `mpu`.
    An `optimizer` built from the model's parameters is re-pointed at them if making the model DeepSpeed-ready
    replaced any."""
    import deepspeed  # the DeepSpeed side needs it; loading alone does not

    check_deepspeed(getattr(deepspeed, "__version__", None), allow_unverified=allow_unverified)
    refuse_training_if_defective(transformers_version())
    record = record_of(model)
    layout = layout_for(record, layout)
    stage = zero_stage_of(config)
    agreement.check_before_deepspeed(model, layout, stage)
    repoint_optimizer(optimizer, make_deepspeed_ready(model))
    record.layout, record.zero_stage = layout, stage
    return layout


def after(engine) -> None:
    """Right after `deepspeed.initialize`: the groups are the DP x EP ones, every expert shard is intact, and the
    engine's save and checkpoint paths know the model is split."""
    guard.check_deepspeed_groups(engine)
    guard.verify_expert_integrity(engine)
    record = record_of(engine)
    record.checked.add("deepspeed hand-over")
    record.zero_stage = engine.zero_optimization_stage()
    engine_paths.attach(engine, record)


def restate_batch_size(config, layout: DPxEPLayout):
    """Launchers compute train_batch_size = micro x accumulation x *ranks*; DeepSpeed, given the mpu, checks it
    against data-parallel replicas. Restate it (only when it is exactly the all-ranks product)."""
    if not isinstance(config, dict) or "train_batch_size" not in config:
        return config
    micro = config.get("train_micro_batch_size_per_gpu")
    accumulation = config.get("gradient_accumulation_steps", 1)
    if not isinstance(micro, int) or not isinstance(accumulation, int):
        return config
    if config["train_batch_size"] == micro * accumulation * layout.world_size:
        config = dict(config, train_batch_size=micro * accumulation * layout.dp_size)
    return config


def initialize(*, model, layout, config, optimizer=None, allow_unverified: bool = False, **kwargs):
    """`deepspeed.initialize` for an EP model with the DP x EP groups, with the library's checks before and after.

    Returns what `deepspeed.initialize` returns. Any keyword it accepts passes through, except ``mpu``.
    """
    import deepspeed

    if "mpu" in kwargs:
        raise TypeError("ep_ds_shim.initialize supplies mpu from the layout; do not pass it")
    if not isinstance(layout, DPxEPLayout):
        raise TypeError(f"layout must be a DPxEPLayout, got {type(layout).__name__}")
    layout = before(model, layout, config, optimizer=optimizer, allow_unverified=allow_unverified)
    result = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=layout.mpu(), **kwargs)
    after(result[0])
    return result
