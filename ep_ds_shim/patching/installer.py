"""From a table of patch points to installed patches: plan read-only, decide, install all or nothing.

A block's table (`loading/patches.py`, `training/launcher_groups.py`) lists `PatchPoint`s. `make_plan` checks every
target's shape without touching anything; `install_plan` then applies one policy for every block: any problem
refuses the block with nothing patched (`drift_error`), a release whose gates already consider expert parallelism
is recognised (`upstream_fixed`: nothing to patch) and one where only some do is refused (`half_fixed_error`), and
otherwise every target is installed, or none: a failure half-way restores what was installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..errors import TargetDriftError
from .scope import ScopeState
from .targets import Patch, ShapeReport, Target, check_shape, install, restore_all


@dataclass(frozen=True)
class PatchPoint:
    """One thing a block wraps, in the block's `scope`. ``role`` names what it is ("entry", "gate", ...); the
    policy reads the "gate" points. ``target`` is None for a point whose targets are derived from the gates: then
    ``derive(gate functions)`` returns (targets, problems) (the ZeRO-3 question: every namespace a gate reads it
    from). ``applies(release line)`` says on which release lines the point is needed."""

    name: str
    role: str
    scope: ScopeState
    wrapper: Callable
    target: Target | None = None
    applies: Callable[[object], bool] = lambda line: True
    derive: Callable[[list], tuple[list[Target], list[str]]] | None = None


@dataclass(frozen=True)
class PlannedPatch:
    point: PatchPoint
    target: Target
    report: ShapeReport


@dataclass
class Plan:
    """Everything a block would patch on the installed releases, computed without touching anything."""

    scope: ScopeState
    line: object | None
    items: list[PlannedPatch] = field(default_factory=list)
    extra_problems: list[str] = field(default_factory=list)  # found while deriving targets (foreign wrappers)

    @property
    def problems(self) -> list[str]:
        return [item.report.problem for item in self.items if not item.report.ok] + self.extra_problems

    @property
    def foreign(self) -> bool:
        """Some problem is another library's wrapper, not a change in the release."""
        return bool(self.extra_problems) or any(item.report.wrapped_by for item in self.items)

    @property
    def gates(self) -> list[PlannedPatch]:
        return [item for item in self.items if item.point.role == "gate"]

    @property
    def upstream_fixed(self) -> bool:
        """Every gate already asks about expert parallelism next to ZeRO-3: upstream routes EP itself."""
        gates = self.gates
        return bool(gates) and all(item.report.ok and item.report.upstream_aware for item in gates)

    @property
    def partly_fixed(self) -> bool:
        aware = [bool(item.report.upstream_aware) for item in self.gates if item.report.ok]
        return any(aware) and not all(aware)


def make_plan(points, scope: ScopeState, line) -> Plan:
    """Read-only shape checks of every point of `scope` that applies to `line` (all of them when `line` is None,
    e.g. for the doctor on a refused release)."""
    plan = Plan(scope, line)
    points = [point for point in points if point.scope is scope and (line is None or point.applies(line))]
    gate_functions = []
    for point in points:
        if point.target is None:
            continue
        report = check_shape(point.target)
        plan.items.append(PlannedPatch(point, point.target, report))
        if point.role == "gate" and report.ok:
            gate_functions.append(point.target.raw())
    for point in points:
        if point.derive is not None:
            targets, problems = point.derive(gate_functions)
            plan.items += [PlannedPatch(point, target, check_shape(target)) for target in targets]
            plan.extra_problems += problems
    return plan


def drift_error(plan: Plan, subject: str, pin: str) -> TargetDriftError:
    """Nothing was patched: every problem, and whether to remove another library's wrapper or to `pin`."""
    problems = list(dict.fromkeys(plan.problems))
    if plan.foreign:
        advice = ("Another library replaced what ep-ds-shim patches; the shim never wraps another library's wrapper. "
                  "Disable that library's patch for the load (or apply it after the block), then try again.")
    else:
        advice = (f"The installed release changed code the shim patches, so no opt-in can make it work. Pin a "
                  f"verified release: {pin}; or report this release with the output of `python -m ep_ds_shim "
                  "doctor`.")
    return TargetDriftError(f"{subject}: nothing was patched, because:\n  - " + "\n  - ".join(problems) + f"\n{advice}")


def half_fixed_error(plan: Plan, subject: str) -> TargetDriftError:
    aware = [item.point.name for item in plan.gates if item.report.upstream_aware]
    return TargetDriftError(
        f"{subject}: some ZeRO-3 gates already consider expert parallelism ({', '.join(aware)}) and others do not. "
        "This half-fixed state was never verified; nothing was patched. Pin a verified release or report it with "
        "`python -m ep_ds_shim doctor`."
    )


def install_plan(plan: Plan, *, drift: Callable[[Plan], Exception],
                 half_fixed: Callable[[Plan], Exception] = lambda plan: half_fixed_error(plan, "the installed release"),
                 upstream_fixed: Callable[[], None] = lambda: None) -> list[Patch]:
    """The one policy: refuse on any problem or a half-fixed release, patch nothing on a fixed one (after
    `upstream_fixed()`, which says so), else install every planned patch."""
    if plan.problems:
        raise drift(plan)
    if plan.partly_fixed:
        raise half_fixed(plan)
    if plan.upstream_fixed:
        upstream_fixed()
        return []
    return install_all(plan)


def install_all(plan: Plan) -> list[Patch]:
    """All or nothing: a failure half-way restores what was installed, then re-raises."""
    installed: list[Patch] = []
    try:
        for item in plan.items:
            installed.append(install(item.target.resolve_owner(), item.target.name, item.point.wrapper,
                                     plan.scope.active))
    except BaseException:
        restore_all(installed)
        raise
    return installed
