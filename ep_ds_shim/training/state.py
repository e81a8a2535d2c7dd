"""Per-thread / per-task state of the `supply_deepspeed_groups` block: the layouts of the open blocks."""

from __future__ import annotations

from ..patching.scope import ScopeState

# The open supply_deepspeed_groups blocks of this thread/task, innermost last; each frame's value is the layout
# the block was given (None: build one matching the model).
GROUPS = ScopeState("supply_deepspeed_groups")
