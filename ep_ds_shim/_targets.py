"""What a patch target is, how its shape is checked, and how it is swapped in and restored exactly.

A target is one attribute looked up at call time: a method in a class's own ``__dict__`` or a name in a
module's namespace. Checking its *shape* (it exists, its descriptor kind, its parameter names, whether it still
consults ZeRO-3) before touching anything is what lets the shim refuse on drift instead of patching half-way.
Restoring always writes back the exact object read from ``vars(owner)`` at install time: never
``getattr(owner, name).__wrapped__``, which for a classmethod is a *bound* method and would rebind ``cls``
for every subclass (DESIGN §5).
"""

from __future__ import annotations

import importlib
import inspect
import types
from dataclasses import dataclass

from .errors import RestoreError, TargetDriftError

ZERO3_QUESTION = "is_deepspeed_zero3_enabled"

# Names whose presence next to the ZeRO-3 question means upstream already decides per load whether EP wants
# the standard path (what transformers PR #45548 does). Matched against the code's looked-up names.
EP_AWARENESS_MARKERS = ("expert_parallel", "ep_size", "ep_plan", "distributed_config", "is_ep")

KINDS = ("classmethod", "staticmethod", "function")


@dataclass(frozen=True)
class Target:
    """One attribute to wrap: ``owner`` is ``"module"`` or ``"module:Class"``; ``params`` are the parameter names
    of the underlying function as verified (``None``: only the leading ones in ``leading_params`` are checked)."""

    owner: str
    name: str
    kind: str
    params: tuple[str, ...] | None = None
    leading_params: tuple[str, ...] = ()

    @property
    def qualname(self) -> str:
        return f"{self.owner.replace(':', '.')}.{self.name}"

    def resolve_owner(self):
        module_name, _, class_name = self.owner.partition(":")
        owner = importlib.import_module(module_name)
        return getattr(owner, class_name) if class_name else owner

    def install(self, wrap) -> "Patch":
        """Replace this target with `wrap(original)`; see `install`."""
        return install(self.resolve_owner(), self.name, wrap)

    def raw(self):
        """The object stored on the owner itself (descriptor included), or raise drift if it is not there."""
        owner = self.resolve_owner()
        namespace = vars(owner)
        if self.name not in namespace:
            raise TargetDriftError(
                f"{self.qualname}: not found on {self.owner} itself (expected a {self.kind} defined there). "
                "This transformers release moved or renamed it; the shim patched nothing. "
                "Run `python -m ep_ds_shim doctor` and report the release."
            )
        return namespace[self.name]


def kind_of(raw) -> str:
    if isinstance(raw, classmethod):
        return "classmethod"
    if isinstance(raw, staticmethod):
        return "staticmethod"
    if isinstance(raw, types.FunctionType):
        return "function"
    return type(raw).__name__


def underlying_function(raw):
    """The plain function behind a descriptor."""
    return raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw


def looked_up_names(function) -> set[str]:
    """Global and attribute names the function's code (nested code included) looks up."""
    names: set[str] = set()
    stack = [function.__code__]
    while stack:
        code = stack.pop()
        names.update(code.co_names)
        stack.extend(const for const in code.co_consts if isinstance(const, types.CodeType))
    return names


@dataclass(frozen=True)
class ShapeReport:
    """What the shape check found for one target; ``problem`` is None when the target is as verified."""

    target: Target
    found_kind: str | None
    found_params: tuple[str, ...] | None
    consults_zero3: bool | None
    ep_aware: bool | None
    problem: str | None

    @property
    def ok(self) -> bool:
        return self.problem is None


def check_shape(target: Target, *, is_gate: bool) -> ShapeReport:
    """Read-only: compare the target with its verified shape. Never raises for drift; reports it."""
    try:
        raw = target.raw()
    except TargetDriftError as error:
        return ShapeReport(target, None, None, None, None, str(error))
    except (ImportError, AttributeError) as error:
        return ShapeReport(target, None, None, None, None, f"{target.qualname}: cannot import its owner ({error})")

    found_kind = kind_of(raw)
    if found_kind != target.kind:
        return ShapeReport(
            target, found_kind, None, None, None,
            f"{target.qualname}: found a {found_kind}, expected a {target.kind}",
        )
    function = underlying_function(raw)
    try:
        found_params = tuple(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        found_params = None
    expected = target.params
    if expected is not None and found_params != expected:
        return ShapeReport(
            target, found_kind, found_params, None, None,
            f"{target.qualname}: parameters {found_params}, expected {expected}",
        )
    if found_params is None or found_params[: len(target.leading_params)] != target.leading_params:
        return ShapeReport(
            target, found_kind, found_params, None, None,
            f"{target.qualname}: parameters {found_params}, expected to start with {target.leading_params}",
        )
    if not is_gate:
        return ShapeReport(target, found_kind, found_params, None, None, None)

    names = looked_up_names(function)
    consults = ZERO3_QUESTION in names
    ep_aware = any(marker in name for name in names for marker in EP_AWARENESS_MARKERS)
    if not consults:
        return ShapeReport(
            target, found_kind, found_params, False, ep_aware,
            f"{target.qualname}: no longer looks up `{ZERO3_QUESTION}` (the ZeRO-3 gate moved elsewhere)",
        )
    return ShapeReport(target, found_kind, found_params, True, ep_aware, None)


@dataclass
class Patch:
    """One installed wrapper and the exact object it replaced."""

    owner: object
    name: str
    original: object
    replacement: object

    def restore(self) -> None:
        current = vars(self.owner).get(self.name)
        if current is not self.replacement:
            raise RestoreError(
                f"{_describe(self.owner)}.{self.name} was replaced by someone else while the shim was active "
                f"(found {current!r}); leaving it as it is rather than clobbering that change."
            )
        setattr(self.owner, self.name, self.original)


def install(owner, name: str, wrap) -> Patch:
    """Replace `owner.name` (read from the owner's own namespace) with `wrap(original)`."""
    original = vars(owner)[name]
    replacement = wrap(original)
    setattr(owner, name, replacement)
    return Patch(owner, name, original, replacement)


def _describe(owner) -> str:
    return owner.__name__ if isinstance(owner, (type, types.ModuleType)) else repr(owner)
