"""Handing an EP model to DeepSpeed: what every library entry point does around `deepspeed.initialize`.

`ep_ds_shim.initialize`, `supply_deepspeed_groups` (accelerate, the Trainer, the zero-edit runner) and `EPTrainer`
all go through `before` and `after`, so the checks cannot drift apart:

before: a verified DeepSpeed, a release where EP training is supported, ZeRO stage 3, a model loaded inside the
    block and made DeepSpeed-ready (also when ZeRO-3 was not signalled at load: the Trainer's load-then-configure
    order), a layout whose EP groups are the ones the model was loaded with, and ranks that agree on all of it.
during: DeepSpeed's `set_deepspeed_parallelism` hook on the model builds DeepSpeed's expert groups
    (`expert_groups.py`); DeepSpeed gets no `mpu`, so its data-parallel group, which partitions the dense weights,
    is every rank.
after: ZeRO-3 partitions every expert shard over its expert-data-parallel group and every dense weight over all
    ranks, every expert shard is intact, and the engine's save / checkpoint paths are made EP-aware
    (`engine_paths`).
"""

from __future__ import annotations

import contextlib
import json
import os


from ..distributed import arrive
from ..errors import DeepSpeedGroupsError, EpShimError
from ..releases.lines import refuse_training_if_unsupported
from ..releases.support import check_deepspeed, transformers_version
from . import agreement, engine_paths, expert_groups, guard, precision
from .deepspeed_ready import make_deepspeed_ready, repoint_optimizer
from .layout import DPxEPLayout
from .record import EPModelRecord, record_of

_auto_layouts: dict[int, DPxEPLayout] = {}


def layout_for(record: EPModelRecord, layout: DPxEPLayout | None) -> DPxEPLayout:
    """`layout`, or one built (once per EP size; a collective) to match the loaded model; its EP group must be the
    one the model was loaded with."""
    if layout is None:
        layout = _auto_layouts.get(record.ep_size)
        if layout is None:
            # building the layout creates process groups, a collective: a hand-over on some ranks only is named
            arrive("auto_layout", what="the DeepSpeed hand-over (building the DP x EP layout)")
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


# Only ZeRO-3 has per-parameter partition groups (DeepSpeed's expert groups at stages 0-2 belong to its own MoE
# layers), so only ZeRO-3 can keep dense weights on every rank's batch and experts on their own group.
SUPPORTED_STAGE = 3


def stage_error(stage) -> EpShimError:
    return EpShimError(
        f"the DeepSpeed config asks for ZeRO stage {stage}; ep-ds-shim trains EP models with ZeRO stage 3 only. "
        "Every rank trains on its own batch: ZeRO-3 partitions the dense weights over all ranks and each expert shard "
        "over the ranks holding the same experts, with DeepSpeed's own expert groups, which DeepSpeed 0.19.3+ applies "
        "per parameter at stage 3 only (at stages 0-2 they belong to its own MoE layers). Set "
        '"zero_optimization": {"stage": 3} in the DeepSpeed config.'
    )


def before(model, layout: DPxEPLayout | None, config, *, optimizer=None, allow_unverified: bool = False) -> DPxEPLayout:
    """Everything checked and prepared before `deepspeed.initialize` runs; returns the layout. An `optimizer` built
    from the model's parameters is re-pointed at them if making the model DeepSpeed-ready replaced any."""
    import deepspeed  # the DeepSpeed side needs it; loading alone does not

    check_deepspeed(getattr(deepspeed, "__version__", None), allow_unverified=allow_unverified)
    expert_groups.require_expert_placement(deepspeed)
    refuse_training_if_unsupported(transformers_version())
    record = record_of(model)
    layout = layout_for(record, layout)
    stage = zero_stage_of(config)
    if stage is not None and stage != SUPPORTED_STAGE:
        raise stage_error(stage)
    agreement.check_before_deepspeed(model, layout, stage)
    precision.check(model, config)
    repoint_optimizer(optimizer, make_deepspeed_ready(model))
    record.layout, record.zero_stage = layout, stage
    record.handing_over = True
    return layout


def after(engine) -> None:
    """Right after `deepspeed.initialize`: ZeRO-3 with DeepSpeed's expert groups, every expert shard intact, and the
    engine's save and checkpoint paths know the model is split."""
    record = record_of(engine)
    record.handing_over = False
    record.zero_stage = engine.zero_optimization_stage()
    if record.zero_stage != SUPPORTED_STAGE:  # a config this side could not read before (a path elsewhere, say)
        raise stage_error(record.zero_stage)
    guard.check_deepspeed_groups(engine)
    guard.verify_expert_integrity(engine)
    record.checked.add("deepspeed hand-over")
    engine_paths.attach(engine, record)


@contextlib.contextmanager
def handing_over(model, layout, config, *, optimizer=None, allow_unverified: bool = False):
    """`before`, then the caller's `deepspeed.initialize`; a failure inside it leaves the model refused to any later
    `deepspeed.initialize` that does not go through the library again."""
    layout = before(model, layout, config, optimizer=optimizer, allow_unverified=allow_unverified)
    try:
        yield layout
    finally:
        record_of(model).handing_over = False


def initialize(*, model, layout, config, optimizer=None, allow_unverified: bool = False, **kwargs):
    """`deepspeed.initialize` for an EP model, with the library's checks before and after.

    DeepSpeed gets no ``mpu``: its data-parallel group is every rank, and the experts go into DeepSpeed's own expert
    groups. Returns what `deepspeed.initialize` returns. Any keyword it accepts passes through, except ``mpu``.
    """
    import deepspeed

    if "mpu" in kwargs:
        raise TypeError(
            "ep_ds_shim.initialize takes no mpu: DeepSpeed's data-parallel group must be every rank (dense weights "
            "are partitioned over all of them, experts over DeepSpeed's own expert groups); drop the mpu argument")
    if not isinstance(layout, DPxEPLayout):
        raise TypeError(f"layout must be a DPxEPLayout, got {type(layout).__name__}")
    with handing_over(model, layout, config, optimizer=optimizer, allow_unverified=allow_unverified):
        result = deepspeed.initialize(model=model, optimizer=optimizer, config=config, **kwargs)
    after(result[0])
    return result
