"""One mechanism for every block the shim offers (`ep_zero3_compat`, `supply_deepspeed_groups`).

A block has two halves:

- *where it acts*: a ContextVar stack of open blocks (`ScopeState`), so each thread / asyncio task has its own
  and nesting works. Entering pushes a frame with `ContextVar.set`, leaving pops it with the matching token
  (`ContextVar.reset`), so leaving in another thread or task than the one that entered is detected (a
  `ScopeError`) instead of silently shifting another context's depth.
- *what is installed*: a process-wide, reference-counted `PatchSet`. The first block to open installs every
  patch of the set (all or nothing), the last one to close restores every attribute to the identical object.
  The wrappers run their logic only where the ContextVar says a block is open; elsewhere they pass through.
"""

from __future__ import annotations

import contextlib
import threading
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Callable

from ..errors import ScopeError
from .targets import Patch, restore_all


@dataclass(eq=False)
class Frame:
    """One open block in one thread/task: the block object, its per-block value, and the token to pop it."""

    block: object
    value: object
    token: Token | None = None


class ScopeState:
    """The per-thread/task stack of open blocks of one kind."""

    def __init__(self, name: str):
        self.name = name
        self.frames: ContextVar[tuple[Frame, ...]] = ContextVar(f"ep_ds_shim_{name}_frames", default=())

    def active(self) -> bool:
        return bool(self.frames.get())

    def depth(self) -> int:
        return len(self.frames.get())

    def innermost(self):
        """The value of the innermost open block here (None outside any block)."""
        frames = self.frames.get()
        return frames[-1].value if frames else None


class PatchSet:
    """Reference-counted, process-wide installation of the patches `install(**options)` returns."""

    def __init__(self, install: Callable[..., list[Patch]]):
        self._install = install
        self._lock = threading.Lock()
        self.users = 0
        self.patches: list[Patch] = []

    def acquire(self, **options) -> None:
        with self._lock:
            if self.users == 0:
                self.patches = self._install(**options)
            self.users += 1

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            if self.users == 0:
                patches, self.patches = self.patches, []
                restore_all(patches)  # every patch is dead afterwards, also the ones it could not restore


class Block(contextlib.ContextDecorator):
    """Base of the shim's blocks: usable as a context manager or a decorator, nestable, thread/task-scoped."""

    state: ScopeState
    patch_set: PatchSet

    def install_options(self) -> dict:
        return {}

    def frame_value(self):
        return None

    def __enter__(self):
        self.patch_set.acquire(**self.install_options())
        frame = Frame(self, self.frame_value())
        frame.token = self.state.frames.set((*self.state.frames.get(), frame))
        return self

    def __exit__(self, exc_type, exc, traceback):
        frames = self.state.frames.get()
        if not frames or frames[-1].block is not self:
            raise ScopeError(
                f"{self.state.name}: leaving a block that is not the innermost open one in this thread/task (it was "
                "entered in another thread or task, or blocks were left out of order). Nothing was changed: open and "
                "leave each block in the same thread/task, e.g. with a `with` statement."
            )
        try:
            self.state.frames.reset(frames[-1].token)
        except ValueError as error:  # the token belongs to another Context (e.g. a copied asyncio context)
            raise ScopeError(
                f"{self.state.name}: this block was entered in another thread/task context than the one leaving it; "
                "nothing was changed. Open and leave each block in the same thread/task."
            ) from error
        self.patch_set.release()
        return False
