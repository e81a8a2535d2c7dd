"""`ep_zero3_compat`: the block users put around `from_pretrained`.

Entering marks the calling thread/task as inside a block and makes sure the wrappers are installed; leaving
undoes both, also on exceptions (the mechanism is `ep_ds_shim.patching.scope`). Usable as a context manager or a
decorator, and nestable.
"""

from __future__ import annotations

from ..patch_registry import LOADING_PATCHES
from ..patching.scope import Block
from .state import LOADING, BlockOptions


class ep_zero3_compat(Block):  # noqa: N801 - reads like the function users call
    """Inside this block, an EP `from_pretrained` takes the standard path at every ZeRO-3 gate.

    Args:
        allow_unverified: accept a transformers release newer than the last verified one (the shape checks
            still run and refuse on drift). Same as setting ``EP_DS_SHIM_ALLOW_UNVERIFIED=1``.
        translate_legacy_spelling: load ``DistributedConfig(enable_expert_parallel=True)`` (+ ``device_mesh``)
            as EP over that mesh on releases where that spelling would silently turn EP off, instead of refusing
            it. Off by default; ``python -m ep_ds_shim.run`` turns it on for unmodified scripts.
    """

    state = LOADING
    patch_set = LOADING_PATCHES

    def __init__(self, *, allow_unverified: bool = False, translate_legacy_spelling: bool = False):
        for name, value in (("allow_unverified", allow_unverified), ("translate_legacy_spelling", translate_legacy_spelling)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        self.allow_unverified = allow_unverified
        self.options = BlockOptions(translate_legacy_spelling=translate_legacy_spelling)

    def install_options(self) -> dict:
        return {"allow_unverified": self.allow_unverified}

    def frame_value(self):
        return self.options
