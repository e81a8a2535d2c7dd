"""Deprecated alias (0.2.0): `EPTrainer` and `EPTrainerMixin` moved to `ep_ds_shim.EPTrainer` /
`ep_ds_shim.EPTrainerMixin` (defined in `ep_ds_shim.training.trainer`). This module goes away in 0.3.0."""

from __future__ import annotations

import warnings

from .training.trainer import EPTrainer, EPTrainerMixin

warnings.warn(
    "ep_ds_shim.hf_trainer is deprecated and will be removed in ep-ds-shim 0.3.0: use ep_ds_shim.EPTrainer / "
    "ep_ds_shim.EPTrainerMixin",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["EPTrainer", "EPTrainerMixin"]
