"""Process-wide installation of the wrappers: check every target first, install all or nothing, restore exactly.

Installed when the first block opens (in any thread) and removed when the last one closes, so after every
block has exited each patched attribute is the identical object it was before. While installed, the wrappers
act only in threads/tasks inside a block (`_state.block_active`), so others see transformers unchanged.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field

from . import _load
from ._releases import Family, allow_unverified_from_env, family_for
from ._targets import Patch, ShapeReport, Target, check_shape, install, underlying_function
from .errors import TargetDriftError
from .gates import Gate, all_gates, wrap_gate
from .gates import ep_mesh, legacy_ep_flag, zero3_question


@dataclass
class Plan:
    """Everything the shim would do on the installed release, computed without touching anything."""

    transformers_version: str
    family: Family
    entry: ShapeReport
    gates: list[tuple[Gate, ShapeReport]]
    question_namespaces: list[str]
    question_problems: list[str] = field(default_factory=list)
    mesh: tuple[Gate, ShapeReport] | None = None
    legacy_flag: ShapeReport | None = None

    @property
    def problems(self) -> list[str]:
        found = [] if self.entry.ok else [self.entry.problem]
        found += [report.problem for _, report in self.gates if not report.ok]
        if self.mesh is not None and not self.mesh[1].ok:
            found.append(self.mesh[1].problem)
        if self.legacy_flag is not None and not self.legacy_flag.ok:
            found.append(self.legacy_flag.problem)
        return found + self.question_problems

    @property
    def upstream_fixed(self) -> bool:
        """Every gate already asks about expert parallelism next to ZeRO-3: upstream routes EP itself."""
        return all(report.ok and report.ep_aware for _, report in self.gates)

    @property
    def partly_fixed(self) -> bool:
        aware = [bool(report.ep_aware) for _, report in self.gates if report.ok]
        return any(aware) and not all(aware)


def _defining_question():
    from transformers.integrations import deepspeed as hf_deepspeed

    return getattr(hf_deepspeed, zero3_question.NAME)


def make_plan(*, allow_unverified: bool = False) -> Plan:
    """Version check (raises UnsupportedReleaseError), then read-only shape checks of every target."""
    import transformers

    version = transformers.__version__
    family = family_for(version, allow_unverified=allow_unverified or allow_unverified_from_env())
    entry = check_shape(_load.ENTRY, is_gate=False)
    gates = [(gate, check_shape(gate.target, is_gate=True)) for gate in all_gates()]

    namespaces, problems = [], []
    defining = _defining_question()
    for gate, report in gates:
        if not report.ok:
            continue
        function = underlying_function(gate.target.raw())
        module_name = function.__module__
        module = sys.modules.get(module_name)
        if module is None or vars(module) is not function.__globals__:
            problems.append(f"{gate.target.qualname}: cannot find the module whose namespace it reads")
            continue
        if module_name in namespaces:
            continue
        bound = vars(module).get(zero3_question.NAME)
        if bound is not defining:
            problems.append(
                f"{module_name}.{zero3_question.NAME}: found {bound!r}, expected the function defined in "
                "transformers.integrations.deepspeed (is another library patching it?)"
            )
            continue
        namespaces.append(module_name)
    mesh = None
    if family.dp_x_ep == "replicate_dim":
        mesh = (ep_mesh.GATE, check_shape(ep_mesh.GATE.target, is_gate=False))
    legacy = check_shape(legacy_ep_flag.TARGET, is_gate=False) if family.legacy_flag_silently_off else None
    return Plan(version, family, entry, gates, namespaces, problems, mesh, legacy)


class _Installation:
    """Reference-counted install of one set of wrappers: the first user installs, the last one restores."""

    def __init__(self, installer=None):
        self.lock = threading.Lock()
        self.users = 0
        self.patches: list[Patch] = []
        self.retired_logged = False
        self.installer = installer or self._install

    def acquire(self, **options) -> None:
        with self.lock:
            if self.users == 0:
                self.patches = self.installer(**options)
            self.users += 1

    def release(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0:
                patches, self.patches = self.patches, []
                _restore(patches)

    def _install(self, allow_unverified: bool) -> list[Patch]:
        plan = make_plan(allow_unverified=allow_unverified)
        if plan.problems:
            raise TargetDriftError(
                f"transformers {plan.transformers_version}: the code ep-ds-shim patches changed shape, so nothing "
                "was patched:\n  - " + "\n  - ".join(plan.problems) + "\nPin a verified release (see "
                "docs/support-matrix.md) or report this with the output of `python -m ep_ds_shim doctor`."
            )
        if plan.partly_fixed:
            aware = [gate.name for gate, report in plan.gates if report.ep_aware]
            raise TargetDriftError(
                f"transformers {plan.transformers_version}: some ZeRO-3 gates already consider expert parallelism "
                f"({', '.join(aware)}) and others do not. This half-fixed state was never verified; nothing was "
                "patched. Pin a verified release or report it with `python -m ep_ds_shim doctor`."
            )
        if plan.upstream_fixed:
            if not self.retired_logged:
                self.retired_logged = True
                _load.logger().warning(
                    f"ep_ds_shim: transformers {plan.transformers_version} already routes EP loads through the "
                    "standard path under ZeRO-3; the loading shim patches nothing (DeepSpeed helpers still apply)."
                )
            return []

        installed: list[Patch] = []
        try:
            for module_name in plan.question_namespaces:
                installed.append(install(sys.modules[module_name], zero3_question.NAME, zero3_question.wrap_question))
            for gate, _ in plan.gates:
                installed.append(gate.target.install(lambda original, gate=gate: wrap_gate(gate, original)))
            if plan.mesh is not None:
                installed.append(plan.mesh[0].target.install(ep_mesh.wrap_mesh))
            if plan.legacy_flag is not None:
                installed.append(legacy_ep_flag.TARGET.install(legacy_ep_flag.wrap_post_init))
            installed.append(_load.ENTRY.install(lambda original: _load.wrap_entry(original, plan.family)))
        except BaseException:
            _restore(installed)
            raise
        return installed


def _restore(patches: list[Patch]) -> None:
    """Undo in reverse order; try every patch even if one fails, then report the first failure."""
    failure = None
    for patch in reversed(patches):
        try:
            patch.restore()
        except Exception as error:  # noqa: BLE001 - keep restoring the others, re-raise below
            failure = failure or error
    if failure is not None:
        raise failure


INSTALLATION = _Installation()


def targets() -> list[Target]:
    """Every attribute the shim may replace (for tests and the doctor)."""
    return [_load.ENTRY, *(gate.target for gate in all_gates()), ep_mesh.GATE.target, legacy_ep_flag.TARGET]
