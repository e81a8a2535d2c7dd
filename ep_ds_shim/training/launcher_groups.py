"""`supply_deepspeed_groups()`: hand `deepspeed.initialize` the DP x EP groups when a launcher calls it.

`accelerate`'s `Accelerator.prepare` and the transformers `Trainer` (through accelerate) call `deepspeed.initialize`
themselves. While a block is open, a call whose model is an EP model the shim loaded goes through the library's
hand-over (`deepspeed_handover.py`): the checks before, DeepSpeed's expert groups built inside it, the checks after.
Other calls pass through untouched. Nothing about the call changes: DeepSpeed's data-parallel group is every rank,
as launchers already assume (their `train_batch_size` counts every rank).

Like `ep_zero3_compat`, the wrapper is installed while a block is open, acts only in the thread/task that opened
it, and leaving restores `deepspeed.initialize` to the identical object (`ep_ds_shim.patching`). This module holds
the block, its per-thread/task state, its one-entry table and the wrapper.
"""

from __future__ import annotations

import inspect

from ..errors import TargetDriftError
from ..log import logger
from ..patching.installer import PatchPoint, install_plan, make_plan
from ..patching.scope import Block, PatchSet, ScopeState
from ..patching.targets import Patch, Target
from . import deepspeed_handover
from .layout import DPxEPLayout
from .record import record_of

# The open supply_deepspeed_groups blocks of this thread/task, innermost last; each frame's value is the layout
# the block was given (None: build one matching the model).
GROUPS = ScopeState("supply_deepspeed_groups")

TARGET = Target("deepspeed", "initialize", "function", leading_params=("args", "model", "optimizer"))
NAME = "deepspeed.initialize"


def supply_groups(wrapped, instance, args, kwargs):
    """The `deepspeed.initialize` wrapper (wrapt signature)."""
    bound = inspect.signature(wrapped).bind_partial(*args, **kwargs)
    model = bound.arguments.get("model")
    if model is None or record_of(model, required=False) is None:
        return wrapped(*args, **kwargs)
    config = bound.arguments.get("config")
    if config is None:
        config = bound.arguments.get("config_params")
    with deepspeed_handover.handing_over(model, GROUPS.innermost(), config,
                                         optimizer=bound.arguments.get("optimizer")) as layout:
        result = wrapped(*args, **kwargs)
    deepspeed_handover.after(result[0])
    logger.info(f"ep_ds_shim: handed the EP model to deepspeed.initialize with DeepSpeed's expert groups ({layout})")
    return result


# The block's table: everything `supply_deepspeed_groups` may replace.
POINTS: tuple[PatchPoint, ...] = (PatchPoint(NAME, "launcher", GROUPS, supply_groups, TARGET),)


def _drift(plan) -> TargetDriftError:
    return TargetDriftError("cannot supply DeepSpeed groups, nothing was patched:\n  - " + "\n  - ".join(plan.problems))


def _install() -> list[Patch]:
    return install_plan(make_plan(POINTS, GROUPS, None), drift=_drift)


GROUPS_PATCHES = PatchSet(_install)


class supply_deepspeed_groups(Block):  # noqa: N801 - reads like the function users call
    """While open, `deepspeed.initialize` calls on EP models the shim loaded get the DP x EP groups.

    Args:
        layout: the `DPxEPLayout` the model was loaded with; default: one built for the model's EP size
            (world = dp x ep, EP groups of consecutive ranks).
    """

    state = GROUPS
    patch_set = GROUPS_PATCHES

    def __init__(self, layout: DPxEPLayout | None = None):
        if layout is not None and not isinstance(layout, DPxEPLayout):
            raise TypeError(f"layout must be a DPxEPLayout or None, got {type(layout).__name__}")
        self.layout = layout

    def frame_value(self):
        return self.layout
