"""The patching mechanism on plain objects, as wrapt tests its patches: no transformers, no DeepSpeed. A fresh
module per test defines the targets; a block built from a one-module table installs wrappers that tag what they
return, so every test can tell a wrapped call from a pass-through one, and every exit is checked to restore the
identical objects."""

from __future__ import annotations

import asyncio
import functools
import sys
import threading
import types

import pytest

from ep_ds_shim.errors import RestoreError, ScopeError, TargetDriftError
from ep_ds_shim.patching.installer import PatchPoint, drift_error, half_fixed_error, install_plan, make_plan
from ep_ds_shim.patching.scope import Block, PatchSet, ScopeState
from ep_ds_shim.patching.targets import Target

SOURCE = '''
class Guarded(type):
    """Refuses to replace an attribute named in `refused` (a target that fails half-way through an install)."""

    refused = set()

    def __setattr__(cls, name, value):
        if name in cls.refused:
            raise RuntimeError(f"{name} is read-only here")
        super().__setattr__(name, value)


class Base(metaclass=Guarded):
    @classmethod
    def make(cls, x):
        return (cls, x)

    @staticmethod
    def add(a, b):
        return a + b

    def method(self, x):
        return (self, x)


class Sub(Base):
    pass


def function(x):
    return x
'''

NAMES = {"make": "classmethod", "add": "staticmethod", "method": "function"}


@pytest.fixture
def plain(monkeypatch):
    module = types.ModuleType("plain_release")
    exec(SOURCE, module.__dict__)  # noqa: S102 - a fresh module of plain objects for every test
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


class Harness:
    """A block kind over `plain_release`: its own scope state, table and patch set; `calls` records what the
    wrapper saw (the bound instance / class)."""

    def __init__(self, targets: dict[str, str] = NAMES, extra: tuple[PatchPoint, ...] = ()):
        self.state = ScopeState("plain")
        self.calls: list[object] = []
        points = tuple(PatchPoint(name, "entry", self.state, self.wrapper, Target("plain_release:Base", name, kind))
                       for name, kind in targets.items())
        self.points = points + extra
        self.patch_set = PatchSet(lambda: install_plan(make_plan(self.points, self.state, None),
                                                       drift=lambda plan: drift_error(plan, "plain", "pin it")))
        self.block = type("PlainBlock", (Block,), {"state": self.state, "patch_set": self.patch_set})

    def wrapper(self, wrapped, instance, args, kwargs):
        self.calls.append(instance)
        return ("wrapped", wrapped(*args, **kwargs))


def stored(module) -> dict[str, object]:
    """Every target as stored on its owner (descriptors included)."""
    return {name: vars(module.Base)[name] for name in NAMES}


def assert_identical(before: dict, module) -> None:
    after = stored(module)
    for name, value in before.items():
        assert after[name] is value, f"{name} was not restored to the identical object"


def test_classmethod_and_staticmethod_rebind_on_a_subclass(plain):
    harness, before = Harness(), stored(plain)
    with harness.block():
        assert plain.Sub.make(1) == ("wrapped", (plain.Sub, 1))  # cls is the subclass, not the class patched
        assert harness.calls[-1] is plain.Sub
        assert plain.Base.make(2) == ("wrapped", (plain.Base, 2))
        assert plain.Sub.add(1, 2) == ("wrapped", 3) and plain.Sub().add(3, 4) == ("wrapped", 7)
        sub = plain.Sub()
        assert sub.method(5) == ("wrapped", (sub, 5))
    assert_identical(before, plain)
    assert plain.Sub.make(1) == (plain.Sub, 1)  # not a classmethod re-bound to Base (the __wrapped__ trap)
    assert isinstance(vars(plain.Base)["make"], classmethod) and isinstance(vars(plain.Base)["add"], staticmethod)


def test_a_foreign_wrapper_over_ours_stays_and_ours_is_disabled(plain):
    harness, before = Harness(), stored(plain)
    block = harness.block()
    block.__enter__()
    ours = vars(plain.Base)["make"]

    def foreign(cls, x):  # another library wraps what it finds, i.e. our wrapper
        return ("foreign", ours.__get__(None, cls)(x))

    plain.Base.make = classmethod(foreign)
    theirs = vars(plain.Base)["make"]
    assert plain.Base.make(1) == ("foreign", ("wrapped", (plain.Base, 1)))
    with pytest.raises(RestoreError, match="replaced by someone else"):
        block.__exit__(None, None, None)
    assert vars(plain.Base)["make"] is theirs  # left as they made it
    calls = len(harness.calls)
    assert plain.Base.make(1) == ("foreign", (plain.Base, 1))  # ours passes through from now on
    assert len(harness.calls) == calls
    assert vars(plain.Base)["add"] is before["add"] and vars(plain.Base)["method"] is before["method"]
    assert harness.patch_set.users == 0 and harness.state.depth() == 0


def test_a_foreign_wrapper_found_before_the_block_is_refused_and_nothing_is_patched(plain):
    original = vars(plain.Base)["method"]

    @functools.wraps(original)
    def foreign(self, x):
        return original(self, x)

    foreign.__module__ = "other_library"
    plain.Base.method = foreign
    before = stored(plain)
    harness = Harness()
    with pytest.raises(TargetDriftError, match="another library patched it") as raised:
        with harness.block():
            pass
    assert "Disable that library's patch" in str(raised.value)
    assert_identical(before, plain)


def test_leaving_out_of_order_is_refused_and_changes_nothing(plain):
    harness, before = Harness(), stored(plain)
    outer, inner = harness.block(), harness.block()
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(ScopeError, match="not the innermost"):
        outer.__exit__(None, None, None)
    assert harness.state.depth() == 2 and harness.patch_set.users == 2
    assert plain.Base.make(1) == ("wrapped", (plain.Base, 1))
    inner.__exit__(None, None, None)
    assert plain.Base.make(1) == ("wrapped", (plain.Base, 1))  # the outer block still holds the patches
    outer.__exit__(None, None, None)
    assert_identical(before, plain)


def test_nested_blocks_and_exceptions_restore_exactly(plain):
    harness, before = Harness(), stored(plain)
    with pytest.raises(KeyError):
        with harness.block():
            with harness.block():
                assert harness.patch_set.users == 2
                raise KeyError("inside")
    assert harness.patch_set.users == 0 and harness.state.depth() == 0
    assert_identical(before, plain)


def test_threads_see_only_their_own_blocks(plain):
    harness, before = Harness(), stored(plain)
    entered, release, done = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def other_thread():
        seen["outside"] = plain.Base.make(1)  # the main thread's block is open: installed, but not here
        with harness.block():
            entered.set()
            release.wait(10)
            seen["inside"] = plain.Base.make(2)  # still wrapped after the main thread left its block
        done.set()

    with harness.block():
        thread = threading.Thread(target=other_thread)
        thread.start()
        assert entered.wait(10)
        assert plain.Base.make(3) == ("wrapped", (plain.Base, 3))
    assert harness.patch_set.users == 1  # the other thread's block keeps the patches installed
    assert plain.Base.make(4) == (plain.Base, 4)  # but this thread is outside any block
    release.set()
    thread.join(10)
    assert done.is_set()
    assert seen == {"outside": (plain.Base, 1), "inside": ("wrapped", (plain.Base, 2))}
    assert_identical(before, plain)


def test_leaving_in_another_thread_is_refused(plain):
    harness, before = Harness(), stored(plain)
    block = harness.block()
    block.__enter__()
    errors = []

    def leave():
        try:
            block.__exit__(None, None, None)
        except ScopeError as error:
            errors.append(error)

    thread = threading.Thread(target=leave)
    thread.start()
    thread.join(10)
    assert len(errors) == 1 and harness.state.depth() == 1
    block.__exit__(None, None, None)
    assert_identical(before, plain)


def test_asyncio_tasks_see_only_their_own_blocks(plain):
    harness, before = Harness(), stored(plain)

    async def inside(entered: asyncio.Event, release: asyncio.Event):
        with harness.block():
            entered.set()
            await release.wait()
            return plain.Base.make("task")

    async def main():
        entered, release = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(inside(entered, release))
        await entered.wait()
        outside = plain.Base.make("main")  # installed (the task's block is open) but this task is outside
        release.set()
        return outside, await task

    assert asyncio.run(main()) == ((plain.Base, "main"), ("wrapped", (plain.Base, "task")))
    assert_identical(before, plain)


def test_leaving_in_a_child_task_is_refused(plain):
    harness, before = Harness(), stored(plain)

    async def leave(block):
        block.__exit__(None, None, None)

    async def main():
        block = harness.block()
        block.__enter__()
        with pytest.raises(ScopeError, match="another thread/task context"):
            await asyncio.create_task(leave(block))  # the child's context is a copy: the token is not its own
        assert harness.state.depth() == 1
        block.__exit__(None, None, None)

    asyncio.run(main())
    assert_identical(before, plain)


def test_install_is_all_or_nothing_when_a_target_fails_half_way(plain):
    harness, before = Harness(), stored(plain)
    plain.Guarded.refused = {"method"}  # the third target: the first two are installed before it fails
    with pytest.raises(RuntimeError, match="method is read-only"):
        with harness.block():
            pass
    assert_identical(before, plain)
    assert harness.patch_set.users == 0 and harness.patch_set.patches == [] and harness.state.depth() == 0
    plain.Guarded.refused = set()
    with harness.block():  # nothing was left behind that would stop the next block
        assert plain.Base.make(1) == ("wrapped", (plain.Base, 1))
    assert_identical(before, plain)


def test_a_missing_target_refuses_the_whole_block(plain):
    harness, before = Harness({**NAMES, "gone": "function"}), stored(plain)
    with pytest.raises(TargetDriftError) as raised:
        with harness.block():
            pass
    message = str(raised.value)
    assert message.startswith("plain: nothing was patched, because:") and "plain_release.Base.gone" in message
    assert "Pin a verified release: pin it" in message
    assert_identical(before, plain)


GATES_SOURCE = '''
def is_deepspeed_zero3_enabled():
    return True


def gate_a(x):
    return is_deepspeed_zero3_enabled()


def gate_b(x):
    return is_deepspeed_zero3_enabled()


def gate_a_fixed(x):
    return is_deepspeed_zero3_enabled() and x.ep_size < 2


def gate_b_fixed(x):
    return is_deepspeed_zero3_enabled() and x.ep_size < 2
'''


@pytest.fixture
def gates(monkeypatch):
    module = types.ModuleType("plain_gates")
    exec(GATES_SOURCE, module.__dict__)  # noqa: S102
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def _gate_plan(state):
    points = tuple(
        PatchPoint(name, "gate", state, lambda wrapped, instance, args, kwargs: wrapped(*args, **kwargs),
                   Target("plain_gates", name, "function", must_look_up="is_deepspeed_zero3_enabled",
                          awareness_markers=("ep_size",)))
        for name in ("gate_a", "gate_b"))
    return make_plan(points, state, None)


@pytest.mark.parametrize("fixed", [(), ("gate_a",), ("gate_a", "gate_b")])
def test_the_upstream_fixed_policy(gates, fixed):
    """No gate aware: install; every gate aware: nothing to patch (said once); some: refused, nothing patched."""
    for name in fixed:
        setattr(gates, name, vars(gates)[f"{name}_fixed"])
    state, said = ScopeState("gates"), []
    before = {name: vars(gates)[name] for name in ("gate_a", "gate_b")}
    plan = _gate_plan(state)

    def install():
        return install_plan(plan, drift=lambda plan: drift_error(plan, "gates", "pin"),
                            half_fixed=lambda plan: half_fixed_error(plan, "gates"),
                            upstream_fixed=lambda: said.append("fixed"))

    if len(fixed) == 1:
        with pytest.raises(TargetDriftError, match=r"gates: some ZeRO-3 gates already consider expert parallelism "
                                                   r"\(gate_a\) and others do not"):
            install()
        assert {name: vars(gates)[name] for name in before} == before
        return
    patches = install()
    if fixed:
        assert patches == [] and said == ["fixed"] and plan.upstream_fixed
    else:
        assert len(patches) == 2 and said == [] and not plan.upstream_fixed and not plan.partly_fixed
        for patch in patches:
            patch.restore()
    assert all(vars(gates)[name] is value for name, value in before.items())


def test_a_point_with_derived_targets_is_planned_from_the_gates(gates):
    """The ZeRO-3 question's pattern: its targets are derived from the checked gates' functions."""
    state = ScopeState("derived")
    seen = []

    def derive(functions):
        seen.extend(functions)
        return [Target("plain_gates", "is_deepspeed_zero3_enabled", "function")], ["a problem found deriving"]

    points = (*(item.point for item in _gate_plan(state).items),
              PatchPoint("question", "question", state, lambda *a: None, derive=derive))
    plan = make_plan(points, state, None)
    assert seen == [gates.gate_a, gates.gate_b]
    assert [item.target.name for item in plan.items][-1] == "is_deepspeed_zero3_enabled"
    assert plan.problems == ["a problem found deriving"] and plan.foreign
