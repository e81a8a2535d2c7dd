"""Every attribute ep-ds-shim may replace: the union of the blocks' own tables, for the doctor, the tests and the
docs (nothing installs from here).

- `ep_zero3_compat`: `ep_ds_shim.loading.patches` (the `from_pretrained` entry, the six ZeRO-3 gates, the ZeRO-3
  question in every namespace a gate reads it from, the DP x EP mesh sizing);
- `supply_deepspeed_groups`: `ep_ds_shim.training.launcher_groups` (`deepspeed.initialize`).

How a table becomes installed patches (plan, policy, all or nothing) is `ep_ds_shim.patching.installer`.
"""

from __future__ import annotations

from .loading.patches import GATES, LOADING_PATCHES, loading_plan
from .loading.patches import POINTS as LOADING_POINTS
from .patching.installer import PatchPoint
from .training.launcher_groups import GROUPS_PATCHES
from .training.launcher_groups import POINTS as GROUPS_POINTS

POINTS: tuple[PatchPoint, ...] = (*LOADING_POINTS, *GROUPS_POINTS)

__all__ = ["GATES", "GROUPS_PATCHES", "LOADING_PATCHES", "POINTS", "loading_plan"]
