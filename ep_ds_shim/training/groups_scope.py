"""`supply_deepspeed_groups()`: hand `deepspeed.initialize` the DP x EP groups when a launcher calls it.

Like `ep_zero3_compat`, the wrapper is installed while a block is open, acts only in the thread/task that opened
it, and leaving restores `deepspeed.initialize` to the identical object (`ep_ds_shim.patching.scope`). What the
wrapper does is `supply.py`.
"""

from __future__ import annotations

from ..patch_registry import GROUPS_PATCHES
from ..patching.scope import Block
from .layout import DPxEPLayout
from .state import GROUPS


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
