"""Per-thread / per-task state of the shim, held in ContextVars.

The wrappers are installed process-wide (once, while any block is open) but *act* only where these variables
say so, so a thread or task that never entered a block sees transformers exactly as it is.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

# How many ep_zero3_compat blocks enclose the current thread/task.
block_depth: ContextVar[int] = ContextVar("ep_ds_shim_block_depth", default=0)

# The `translate_legacy_spelling` option of each enclosing block, innermost last (`ep_ds_shim.run` turns it on).
translate_options: ContextVar[tuple] = ContextVar("ep_ds_shim_translate_options", default=())


def translating_legacy_spelling() -> bool:
    """Whether the innermost enclosing block translates the legacy EP spelling."""
    options = translate_options.get()
    return bool(options) and options[-1]


# Whether the ZeRO-3 question answers False right now (set only while a gated call of an EP load runs).
hiding_zero3: ContextVar[bool] = ContextVar("ep_ds_shim_hiding_zero3", default=False)


@dataclass
class LoadRecord:
    """One `from_pretrained` call seen inside a block."""

    model_class: str
    ep_size: int | None  # None: the call does not ask for expert parallelism
    zero3: bool  # ZeRO-3 was signalled when the call started
    gates_taken: list[str] = field(default_factory=list)

    @property
    def acts(self) -> bool:
        """The shim changes this load only when EP is requested while ZeRO-3 is signalled."""
        return self.ep_size is not None and self.ep_size > 1 and self.zero3


current_load: ContextVar[LoadRecord | None] = ContextVar("ep_ds_shim_current_load", default=None)


def block_active() -> bool:
    return block_depth.get() > 0


@contextmanager
def hidden_zero3():
    token = hiding_zero3.set(True)
    try:
        yield
    finally:
        hiding_zero3.reset(token)


@contextmanager
def loading(record: LoadRecord):
    token = current_load.set(record)
    try:
        yield record
    finally:
        current_load.reset(token)
