"""Runs of transformers releases the shim handles alike (`ReleaseLine`), and which one the installed release is on.

A line says how its releases spell an EP request (`releases/spelling.py`) and what they need on top. Which
releases are *verified* is `releases/support.py`; a line can cover releases newer than the verified range, so an
opted-in newer release uses the newest line's strategy (its shape checks still run).
"""

from __future__ import annotations

from dataclasses import dataclass

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ..errors import UnsupportedReleaseError
from .spelling import EpSizeWithReplicatePlan, EPSpelling, FlagWithDeviceMesh, FlagWithTpSize
from .support import refusal_for, support_hint, training_defect


@dataclass(frozen=True)
class ReleaseLine:
    """A run of releases the shim handles alike: how they spell an EP request, and what they need on top."""

    releases: SpecifierSet
    spelling: EPSpelling
    # A DP x EP load (world > ep) reaches its EP sub-group through the release's own mesh, sized by
    # loading/replica_mesh.py; without it, world > ep is refused with a clear error.
    replica_mesh: bool = False
    # DistributedConfig(enable_expert_parallel=True) alone resolves to ep_size=1 (EP silently off).
    legacy_flag_silently_off: bool = False
    # The release's EP plans route tokens to the experts' ranks with its own token dispatcher
    # (`ep_dispatch_experts`: an all-to-all), which also serves ranks that hold *different* batches. DeepSpeed
    # training relies on it: every rank trains on its own batch (training/token_dispatch.py).
    token_dispatch: bool = False
    # The release's EP hook all-reduces the experts' output only while their weights are DTensors (5.17-5.18): once
    # the shim makes them plain local tensors (a load with ZeRO-3 signalled), it must attach that reduction itself.
    expert_output_reduce_needs_dtensors: bool = False

    @property
    def name(self) -> str:
        """The minors the line covers, read from `releases` (the one place its range is written): "5.6-5.14",
        or "5.23+" for a line without an upper bound."""
        lower = next(Version(spec.version) for spec in self.releases if spec.operator == ">=")
        upper = [Version(spec.version) for spec in self.releases if spec.operator == "<"]
        if not upper:
            return f"{lower.major}.{lower.minor}+"
        last = upper[0]
        return f"{lower.major}.{lower.minor}-{last.major}.{last.minor - 1}"


RELEASE_LINES = (
    # plain-tensor expert shards; a DP x EP load over device_mesh=mesh["ep"] works upstream, but training is
    # refused on these releases (UPSTREAM_TRAINING_DEFECTS) and the shim has not verified it, so world > ep is
    # refused.
    ReleaseLine(SpecifierSet(">=5.6.0,<5.15"), FlagWithDeviceMesh()),
    # DistributedMixin; the flag alone raises TypeError; DTensor experts from 5.16; EP is tensor-parallel-like
    # (`ep_router` + `moe_tp_experts`: every rank of the EP group must hold the same batch), so no DeepSpeed training
    ReleaseLine(SpecifierSet(">=5.15.0,<5.19"), FlagWithTpSize(), expert_output_reduce_needs_dtensors=True),
    # ep_size and a mesh manager; with tp_size=N the flag also empties the TP plan (dense layers stay whole)
    ReleaseLine(SpecifierSet(">=5.20.0,<5.23"), FlagWithTpSize(), legacy_flag_silently_off=True,
                token_dispatch=True),
    ReleaseLine(SpecifierSet(">=5.23.0"), EpSizeWithReplicatePlan(), replica_mesh=True,
                legacy_flag_silently_off=True, token_dispatch=True),
)

# Why a release without the token dispatcher cannot train under DeepSpeed with this library.
NO_TOKEN_DISPATCH = (
    "ep-ds-shim trains EP models with every rank on its own batch (ZeRO-3 partitions the dense weights over all "
    "ranks), which needs the release's expert-parallel token dispatcher (`ep_dispatch_experts`, transformers 5.20 "
    "and newer); this release's EP needs every rank of an EP group to hold the same batch. Loading and inference "
    "are fine. Train on transformers 5.20 or newer (`python -m ep_ds_shim doctor` shows what was verified)"
)


def release_line_for(version: str) -> ReleaseLine:
    """The line whose strategy applies to `version`; a refused release raises its reason. Says nothing about
    whether `version` is verified (`support.check_transformers` does)."""
    refusal = refusal_for(version)
    if refusal is not None:
        raise UnsupportedReleaseError(f"transformers {version} is not supported by ep-ds-shim: {refusal}. {support_hint()}")
    parsed = Version(version)
    for line in RELEASE_LINES:
        if parsed in line.releases:
            return line
    raise UnsupportedReleaseError(f"transformers {version}: no strategy covers it. {support_hint()}")


def training_refusal(version: str) -> str | None:
    """Why DeepSpeed training of an EP model is refused on `version` (an upstream defect, or a release without the
    token dispatcher), or None when it is supported."""
    defect = training_defect(version)
    if defect is not None:
        return defect
    return None if release_line_for(version).token_dispatch else NO_TOKEN_DISPATCH


def refuse_training_if_unsupported(version: str) -> None:
    reason = training_refusal(version)
    if reason is not None:
        raise UnsupportedReleaseError(f"transformers {version}: {reason}.")
