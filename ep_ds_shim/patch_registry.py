"""Every attribute ep-ds-shim may replace, listed once.

Installing, restoring, the shape checks, the doctor and the tests all read `POINTS`, so a new patch target is one
entry here (plus the module that says what its wrapper does and why). Two blocks install from it:

- `ep_zero3_compat` (scope `LOADING`): the `from_pretrained` entry, the six ZeRO-3 gates, the ZeRO-3 question in
  every namespace a gate reads it from, and the DP x EP mesh sizing;
- `supply_deepspeed_groups` (scope `GROUPS`): `deepspeed.initialize`, for launchers that call it themselves.

Nothing is patched until a block opens; then every target's shape is checked first and, on any problem, nothing
is patched at all.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable


from packaging.version import Version

from .errors import TargetDriftError, UnsupportedReleaseError
from .log import logger
from .loading import entry, replica_mesh, zero3_question
from .loading.gates import device_map, from_config, init_context, loader, missing_keys_init, missing_keys_to_device
from .loading.gates.common import Gate, run_gate
from .loading.state import LOADING
from .patching.scope import PatchSet, ScopeState
from .patching.targets import Patch, ShapeReport, Target, check_shape, install, restore_all
from .releases.lines import ReleaseLine, release_line_for
from .releases.support import (
    VERIFIED_TRANSFORMERS,
    check_transformers,
    first_unverified,
    refusal_for,
    transformers_version,
)
from .training import supply
from .training.state import GROUPS

GATES: tuple[Gate, ...] = (init_context.GATE, from_config.GATE, device_map.GATE, loader.GATE,
                           missing_keys_to_device.GATE, missing_keys_init.GATE)


@dataclass(frozen=True)
class PatchPoint:
    """One thing the shim wraps. ``target`` is None for the ZeRO-3 question, whose targets are derived from the
    gates (every module namespace a gate reads it from). ``applies`` says on which release lines it is needed."""

    name: str
    role: str
    scope: ScopeState
    wrapper: Callable
    target: Target | None = None
    applies: Callable[[ReleaseLine], bool] = lambda line: True


POINTS: tuple[PatchPoint, ...] = (
    PatchPoint(entry.NAME, "entry", LOADING, entry.from_pretrained, entry.TARGET),
    *(PatchPoint(gate.name, "gate", LOADING, run_gate(gate), gate.target) for gate in GATES),
    PatchPoint(zero3_question.ZERO3_QUESTION, "question", LOADING, zero3_question.answer),
    PatchPoint(replica_mesh.NAME, "mesh", LOADING, replica_mesh.build_meshes, replica_mesh.TARGET,
               applies=lambda line: line.replica_mesh),
    PatchPoint(supply.NAME, "launcher", GROUPS, supply.supply_groups, supply.TARGET),
)


@dataclass(frozen=True)
class PlannedPatch:
    point: PatchPoint
    target: Target
    report: ShapeReport


@dataclass
class Plan:
    """Everything a block would patch on the installed releases, computed without touching anything."""

    scope: ScopeState
    line: ReleaseLine | None
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


def make_plan(scope: ScopeState, line: ReleaseLine | None) -> Plan:
    """Read-only shape checks of every point of `scope` that applies to `line` (all of them when the release has
    no line, e.g. for the doctor on a refused release)."""
    plan = Plan(scope, line)
    points = [point for point in POINTS if point.scope is scope and (line is None or point.applies(line))]
    gate_raws = []
    for point in points:
        if point.target is None:
            continue
        report = check_shape(point.target)
        plan.items.append(PlannedPatch(point, point.target, report))
        if point.role == "gate" and report.ok:
            gate_raws.append(point.target.raw())
    for point in points:
        if point.role == "question":
            targets, problems = zero3_question.bindings(gate_raws)
            plan.items += [PlannedPatch(point, target, check_shape(target)) for target in targets]
            plan.extra_problems += problems
    return plan


def loading_plan(*, allow_unverified: bool = False) -> Plan:
    """The loading block's plan on the installed transformers: version check first (UnsupportedReleaseError).

    A release newer than the verified range whose patched code changed is refused with what changed and what to pin
    (TargetDriftError), not with the advice to verify and opt in: the opt-in would end at the same shape checks."""
    version = transformers_version()
    try:
        check_transformers(version, allow_unverified=allow_unverified)
    except UnsupportedReleaseError:
        if refusal_for(version) is None and Version(version) >= first_unverified():
            plan = make_plan(LOADING, release_line_for(version))
            if plan.problems:
                raise drift_error(plan) from None
        raise
    return make_plan(LOADING, release_line_for(version))


def drift_error(plan: Plan) -> TargetDriftError:
    problems = list(dict.fromkeys(plan.problems))
    if plan.foreign:
        advice = ("Another library replaced what ep-ds-shim patches; the shim never wraps another library's wrapper. "
                  "Disable that library's patch for the load (or apply it after the block), then try again.")
    else:
        advice = (f"The installed release changed code the shim patches, so no opt-in can make it work. Pin a "
                  f"verified release: pip install 'transformers{VERIFIED_TRANSFORMERS}'; or report this release with "
                  "the output of `python -m ep_ds_shim doctor`.")
    return TargetDriftError(
        f"transformers {transformers_version()}: nothing was patched, because:\n  - " + "\n  - ".join(problems)
        + f"\n{advice}"
    )


@functools.cache
def _log_upstream_fixed(version: str) -> None:
    logger.info(
        f"ep_ds_shim: transformers {version} already routes EP loads through the standard path under ZeRO-3; the "
        "loading block patches nothing (the DeepSpeed side still applies)."
    )


def _install_loading(allow_unverified: bool = False) -> list[Patch]:
    plan = loading_plan(allow_unverified=allow_unverified)
    if plan.problems:
        raise drift_error(plan)
    if plan.partly_fixed:
        aware = [item.point.name for item in plan.gates if item.report.upstream_aware]
        raise TargetDriftError(
            f"transformers {transformers_version()}: some ZeRO-3 gates already consider expert parallelism "
            f"({', '.join(aware)}) and others do not. This half-fixed state was never verified; nothing was "
            "patched. Pin a verified release or report it with `python -m ep_ds_shim doctor`."
        )
    if plan.upstream_fixed:
        _log_upstream_fixed(transformers_version())
        return []
    return _install(plan)


def _install_groups() -> list[Patch]:
    plan = make_plan(GROUPS, None)
    if plan.problems:
        raise TargetDriftError(
            "cannot supply DeepSpeed groups, nothing was patched:\n  - " + "\n  - ".join(plan.problems)
        )
    return _install(plan)


def _install(plan: Plan) -> list[Patch]:
    """All or nothing: a failure half-way restores what was installed."""
    installed: list[Patch] = []
    try:
        for item in plan.items:
            installed.append(install(item.target.resolve_owner(), item.target.name, item.point.wrapper,
                                     plan.scope.active))
    except BaseException:
        restore_all(installed)
        raise
    return installed


LOADING_PATCHES = PatchSet(_install_loading)
GROUPS_PATCHES = PatchSet(_install_groups)


def snapshot(plan: Plan) -> dict[str, object]:
    """Every planned attribute as stored on its owner right now (tests compare identities across a block)."""
    return {item.target.qualname: vars(item.target.resolve_owner())[item.target.name] for item in plan.items}

