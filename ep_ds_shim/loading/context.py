"""Per-thread / per-task state of the loading block, held in ContextVars.

The wrappers are installed process-wide (once, while any block is open) but *act* only where these variables
say so, so a thread or task that never entered a block sees transformers exactly as it is.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from ..patching.scope import ScopeState


@dataclass(frozen=True)
class BlockOptions:
    """What one `ep_zero3_compat` block asks for (the innermost open block decides)."""

    translate_upstream_spelling: bool = True


# The open ep_zero3_compat blocks of this thread/task, innermost last.
LOADING = ScopeState("ep_zero3_compat")


def translating_upstream_spelling() -> bool:
    """Whether the innermost enclosing block translates upstream's EP spellings under ZeRO-3 (else refuses them)."""
    options = LOADING.innermost()
    return bool(options is None or options.translate_upstream_spelling)


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
        """The gates change this load only when EP is requested while ZeRO-3 is signalled."""
        return self.ep_size is not None and self.ep_size > 1 and self.zero3

    def took(self, gate: str) -> None:
        if gate not in self.gates_taken:
            self.gates_taken.append(gate)


current_load: ContextVar[LoadRecord | None] = ContextVar("ep_ds_shim_current_load", default=None)


def acting_load() -> LoadRecord | None:
    """The EP-under-ZeRO-3 load running in this thread/task, if any."""
    load = current_load.get()
    return load if load is not None and load.acts else None


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
