"""What a patch target is, how its shape is checked, and how it is swapped in and restored exactly.

A target is one attribute looked up at call time: a method in a class's own ``__dict__`` or a name in a
module's namespace. Checking its *shape* (it exists, its descriptor kind, its parameter names, whether it still
looks up the name it is patched for) before touching anything is what lets the shim refuse on drift instead of
patching half-way. Restoring always writes back the exact object read from ``vars(owner)`` at install time:
never ``getattr(owner, name).__wrapped__``, which for a classmethod is a *bound* method and would rebind ``cls``
for every subclass (docs/design.md, "Patching").
"""

from __future__ import annotations

import importlib
import inspect
import types
from dataclasses import dataclass
from typing import Callable

import wrapt

from ..errors import RestoreError, TargetDriftError

# The base class of every wrapt proxy (wrapt 2 names it BaseObjectProxy; in 1.x it is ObjectProxy).
_WRAPT_PROXY = getattr(wrapt, "BaseObjectProxy", wrapt.ObjectProxy)


@dataclass(frozen=True)
class Target:
    """One attribute to wrap.

    ``owner`` is ``"module"`` or ``"module:Class"``; ``params`` are the parameter names of the underlying function
    as verified (``None``: only ``leading_params`` are checked), and ``other_params`` further parameter lists
    verified on other releases (a release that added a parameter the wrapper passes through untouched: each list
    is exact, so a third spelling is still drift). ``must_look_up``: a global name the function must
    still look up (a gate that no longer asks the ZeRO-3 question has moved and is drift); ``awareness_markers``:
    names whose presence next to it means upstream already handles the case the patch exists for.
    """

    owner: str
    name: str
    kind: str
    params: tuple[str, ...] | None = None
    other_params: tuple[tuple[str, ...], ...] = ()
    leading_params: tuple[str, ...] = ()
    must_look_up: str | None = None
    awareness_markers: tuple[str, ...] = ()

    @property
    def verified_params(self) -> tuple[tuple[str, ...], ...]:
        """Every exact parameter list verified for this target (empty when only ``leading_params`` are checked)."""
        return () if self.params is None else (self.params, *self.other_params)

    @property
    def qualname(self) -> str:
        return f"{self.owner.replace(':', '.')}.{self.name}"

    def resolve_owner(self):
        module_name, _, class_name = self.owner.partition(":")
        owner = importlib.import_module(module_name)
        return getattr(owner, class_name) if class_name else owner

    def raw(self):
        """The object stored on the owner itself (descriptor included), or raise drift if it is not there."""
        namespace = vars(self.resolve_owner())
        if self.name not in namespace:
            raise TargetDriftError(
                f"{self.qualname}: not found on {self.owner} itself (expected a {self.kind} defined there); the "
                "installed release moved or renamed it."
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


def foreign_wrapper(raw, home: str) -> str | None:
    """Who wrapped this attribute, if it is another library's wrapper rather than the release's own function:
    a wrapt proxy that is not ep-ds-shim's, or a ``functools.wraps`` wrapper defined outside the `home` package.
    Named so a drift message can say "another library patched X" instead of "the release changed X"."""
    # a wrapt proxy passes isinstance(classmethod) checks through to what it wraps: look at the proxy itself first
    proxy = raw if isinstance(raw, _WRAPT_PROXY) else underlying_function(raw)
    function = underlying_function(raw)
    if isinstance(proxy, _WRAPT_PROXY):
        wrapper = getattr(proxy, "_self_wrapper", None)
        if (getattr(wrapper, "__module__", "") or "").startswith(__package__.partition(".")[0] + "."):
            return None  # the shim's own wrapper (the doctor may run inside a block)
        return f"a wrapt wrapper ({getattr(wrapper, '__module__', '?')}.{getattr(wrapper, '__qualname__', wrapper)})"
    module = getattr(function, "__module__", None) or ""
    if getattr(function, "__wrapped__", None) is not None and module.partition(".")[0] != home:
        return f"a wrapper defined in {module or 'an unknown module'}"
    return None


@dataclass(frozen=True)
class ShapeReport:
    """What the shape check found for one target; ``problem`` is None when the target is as verified."""

    target: Target
    found_kind: str | None = None
    found_params: tuple[str, ...] | None = None
    looks_up: bool | None = None
    upstream_aware: bool | None = None
    problem: str | None = None
    wrapped_by: str | None = None  # another library's wrapper found in its place (the problem names it)

    @property
    def ok(self) -> bool:
        return self.problem is None


def check_shape(target: Target) -> ShapeReport:
    """Read-only: compare the target with its verified shape. Never raises for drift; reports it."""
    try:
        raw = target.raw()
    except TargetDriftError as error:
        return ShapeReport(target, problem=str(error))
    except (ImportError, AttributeError) as error:
        return ShapeReport(target, problem=f"{target.qualname}: cannot import its owner ({error})")

    wrapped_by = foreign_wrapper(raw, target.owner.partition(".")[0].partition(":")[0])
    if wrapped_by is not None:
        return ShapeReport(
            target, problem=f"{target.qualname} is {wrapped_by}: another library patched it", wrapped_by=wrapped_by
        )
    found_kind = kind_of(raw)
    if found_kind != target.kind:
        return ShapeReport(target, found_kind, problem=f"{target.qualname}: found a {found_kind}, expected a {target.kind}")
    function = underlying_function(raw)
    try:
        found_params = tuple(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        found_params = None
    if target.params is not None and found_params not in target.verified_params:
        expected = " or ".join(map(str, target.verified_params))
        return ShapeReport(
            target, found_kind, found_params,
            problem=f"{target.qualname}: parameters {found_params}, expected {expected}",
        )
    if found_params is None or found_params[: len(target.leading_params)] != target.leading_params:
        return ShapeReport(
            target, found_kind, found_params,
            problem=f"{target.qualname}: parameters {found_params}, expected to start with {target.leading_params}",
        )
    if target.must_look_up is None:
        return ShapeReport(target, found_kind, found_params)
    names = looked_up_names(function)
    aware = any(marker in name for name in names for marker in target.awareness_markers)
    if target.must_look_up not in names:
        return ShapeReport(
            target, found_kind, found_params, False, aware,
            problem=f"{target.qualname}: no longer looks up `{target.must_look_up}` (the gate moved elsewhere)",
        )
    return ShapeReport(target, found_kind, found_params, True, aware)


@dataclass(eq=False)
class Patch:
    """One installed wrapper and the exact object it replaced.

    ``live`` is read by the wrapper on every call: once the patch is restored, or found buried under someone
    else's wrapper and left in place, it is False and the wrapper passes every call straight through, so
    nothing of the shim stays active either way.
    """

    owner: object
    name: str
    original: object
    replacement: object = None
    live: bool = True

    def restore(self) -> None:
        self.live = False
        current = vars(self.owner).get(self.name)
        if current is not self.replacement:
            raise RestoreError(
                f"{describe(self.owner)}.{self.name} was replaced by someone else while the shim was active (found "
                f"{current!r}); left as it is rather than clobbering that change. The shim's wrapper under it is "
                "disabled, so it passes every call through."
            )
        setattr(self.owner, self.name, self.original)


def install(owner, name: str, wrapper: Callable, active: Callable[[], bool]) -> Patch:
    """Replace `owner.name` (read from the owner's own namespace) with a wrapt wrapper that runs `wrapper` only
    while `active()` says so and the patch is live; otherwise the original runs untouched."""
    patch = Patch(owner, name, vars(owner)[name])
    patch.replacement = wrapt.FunctionWrapper(patch.original, wrapper, enabled=lambda: patch.live and active())
    setattr(owner, name, patch.replacement)
    return patch


def restore_all(patches: list[Patch]) -> None:
    """Undo in reverse order; try every patch even if one fails, then raise the first failure."""
    failure = None
    for patch in reversed(patches):
        try:
            patch.restore()
        except Exception as error:  # noqa: BLE001 - keep restoring the others, re-raise below
            failure = failure or error
    if failure is not None:
        raise failure


def describe(owner) -> str:
    return owner.__name__ if isinstance(owner, (type, types.ModuleType)) else repr(owner)
