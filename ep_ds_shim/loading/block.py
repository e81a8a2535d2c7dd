"""`ep_zero3_compat`: the block users put around `from_pretrained`.

Entering marks the calling thread/task as inside a block and makes sure the wrappers are installed; leaving
undoes both, also on exceptions (the mechanism is `ep_ds_shim.patching.scope`). Usable as a context manager or a
decorator, and nestable.
"""

from __future__ import annotations

from .patches import LOADING_PATCHES
from ..patching.scope import Block
from .context import LOADING, BlockOptions


class ep_zero3_compat(Block):  # noqa: N801 - reads like the function users call
    """Inside this block, an EP `from_pretrained` takes the standard path at every ZeRO-3 gate.

    Args:
        allow_unverified: accept a transformers release newer than the last verified one (the shape checks
            still run and refuse on drift). Same as setting ``EP_DS_SHIM_ALLOW_UNVERIFIED=1``.
        translate_upstream_spelling: under ZeRO-3, load upstream's own EP spellings as the library's EP request
            (dense layers whole, a log line says so): ``DistributedConfig(tp_size=N, ep_size=N)``, which would also
            split the dense layers, and ``DistributedConfig(enable_expert_parallel=True)`` (+ ``device_mesh``),
            which silently means no EP on 5.20+. On by default; False refuses them before any weight is read, with
            the one-line fix. ``translate_legacy_spelling`` is its former name.
    """

    state = LOADING
    patch_set = LOADING_PATCHES

    def __init__(self, *, allow_unverified: bool = False, translate_upstream_spelling: bool = True,
                 translate_legacy_spelling: bool | None = None):
        if translate_legacy_spelling is not None:  # the former name of the same switch
            translate_upstream_spelling = translate_legacy_spelling
        for name, value in (("allow_unverified", allow_unverified),
                            ("translate_upstream_spelling", translate_upstream_spelling)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        self.allow_unverified = allow_unverified
        self.options = BlockOptions(translate_upstream_spelling=translate_upstream_spelling)

    def install_options(self) -> dict:
        return {"allow_unverified": self.allow_unverified}

    def frame_value(self):
        return self.options
