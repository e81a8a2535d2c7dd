"""`ep_zero3_compat`: the block users put around `from_pretrained`.

Entering marks the calling thread/task as inside a block (a ContextVar depth, so nesting works and other
threads are unaffected) and makes sure the wrappers are installed; leaving undoes both, also on exceptions.
Usable as a context manager or a decorator.
"""

from __future__ import annotations

import contextlib

from ._install import INSTALLATION
from ._state import block_depth


class ep_zero3_compat(contextlib.ContextDecorator):  # noqa: N801 - reads like the function users call
    """Inside this block, an EP `from_pretrained` takes the standard path at every ZeRO-3 gate.

    Args:
        allow_unverified: accept a transformers release newer than the last verified one (the shape checks
            still run and refuse on drift). Same as setting ``EP_DS_SHIM_ALLOW_UNVERIFIED=1``.
    """

    def __init__(self, *, allow_unverified: bool = False):
        if not isinstance(allow_unverified, bool):
            raise TypeError(f"allow_unverified must be a bool, got {type(allow_unverified).__name__}")
        self.allow_unverified = allow_unverified

    def __enter__(self):
        INSTALLATION.acquire(allow_unverified=self.allow_unverified)
        block_depth.set(block_depth.get() + 1)
        return self

    def __exit__(self, exc_type, exc, traceback):
        block_depth.set(block_depth.get() - 1)
        INSTALLATION.release()
        return False
