"""The loading block's table: every attribute `ep_zero3_compat` may replace, listed once.

The `from_pretrained` entry, the six ZeRO-3 gates, the ZeRO-3 question in every namespace a gate reads it from,
and the DP x EP mesh sizing. Installing, restoring, the shape checks, the doctor and the tests all read `POINTS`,
so a new loading target is one entry here (plus the module that says what its wrapper does and why). How a table
becomes installed patches (plan, policy, all or nothing) is `ep_ds_shim.patching.installer`; this module adds what only
the loading side knows: the release check before the plan, and what to pin.
"""

from __future__ import annotations

import functools

from packaging.version import Version

from ..errors import UnsupportedReleaseError
from ..log import logger
from ..patching.installer import Plan, PatchPoint, drift_error, half_fixed_error, install_plan, make_plan
from ..patching.scope import PatchSet
from ..patching.targets import Patch
from ..releases.lines import release_line_for
from ..releases.support import (
    VERIFIED_TRANSFORMERS,
    check_transformers,
    first_unverified,
    refusal_for,
    transformers_version,
)
from . import entry, replica_mesh, zero3_question
from .context import LOADING
from .gates import device_map, from_config, init_context, loader, missing_keys_init, missing_keys_to_device
from .gates.common import Gate, run_gate

GATES: tuple[Gate, ...] = (init_context.GATE, from_config.GATE, device_map.GATE, loader.GATE,
                           missing_keys_to_device.GATE, missing_keys_init.GATE)

POINTS: tuple[PatchPoint, ...] = (
    PatchPoint(entry.NAME, "entry", LOADING, entry.from_pretrained, entry.TARGET),
    *(PatchPoint(gate.name, "gate", LOADING, run_gate(gate), gate.target) for gate in GATES),
    PatchPoint(zero3_question.ZERO3_QUESTION, "question", LOADING, zero3_question.answer,
               derive=zero3_question.bindings),
    PatchPoint(replica_mesh.NAME, "mesh", LOADING, replica_mesh.build_meshes, replica_mesh.TARGET,
               applies=lambda line: line.replica_mesh),
)


def loading_plan(*, allow_unverified: bool = False) -> Plan:
    """The loading block's plan on the installed transformers: version check first (UnsupportedReleaseError).

    A release newer than the verified range whose patched code changed is refused with what changed and what to pin
    (TargetDriftError), not with the advice to verify and opt in: the opt-in would end at the same shape checks."""
    version = transformers_version()
    try:
        check_transformers(version, allow_unverified=allow_unverified)
    except UnsupportedReleaseError:
        if refusal_for(version) is None and Version(version) >= first_unverified():
            plan = make_plan(POINTS, LOADING, release_line_for(version))
            if plan.problems:
                raise loading_drift_error(plan) from None
        raise
    return make_plan(POINTS, LOADING, release_line_for(version))


def loading_drift_error(plan: Plan):
    return drift_error(plan, f"transformers {transformers_version()}",
                       f"pip install 'transformers{VERIFIED_TRANSFORMERS}'")


@functools.cache
def _log_upstream_fixed(version: str) -> None:
    logger.info(
        f"ep_ds_shim: transformers {version} already routes EP loads through the standard path under ZeRO-3; the "
        "loading block patches nothing (the DeepSpeed side still applies)."
    )


def _install(allow_unverified: bool = False) -> list[Patch]:
    return install_plan(
        loading_plan(allow_unverified=allow_unverified),
        drift=loading_drift_error,
        half_fixed=lambda plan: half_fixed_error(plan, f"transformers {transformers_version()}"),
        upstream_fixed=lambda: _log_upstream_fixed(transformers_version()),
    )


LOADING_PATCHES = PatchSet(_install)
