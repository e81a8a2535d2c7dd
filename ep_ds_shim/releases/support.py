"""Which transformers / DeepSpeed releases the shim handles, and how each run of releases is handled.

Keyed by `packaging` specifiers. A version decides the *strategy*; the shape checks (`ep_ds_shim.patching`) then
decide whether the installed code still looks like what that strategy was verified on. A version number alone is
never enough to patch.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ..errors import UnsupportedReleaseError
from .verified import MATRIX_RELEASES

# 0.19.3 added per-parameter ZeRO-3 placement (AutoEP's expert families), which the experts' partition groups need
VERIFIED_DEEPSPEED = SpecifierSet(">=0.19.3,<0.20")

# Opting in to a transformers release newer than the last verified one. The shape checks still run.
ALLOW_UNVERIFIED_ENV = "EP_DS_SHIM_ALLOW_UNVERIFIED"


@dataclass(frozen=True)
class Refusal:
    releases: SpecifierSet
    reason: str


REFUSED = (
    Refusal(
        SpecifierSet("<5.0"),
        "transformers 4.x has a different loader (load_shard_file) and no "
        "_move_missing_keys_from_meta_to_device; the shim's gates do not exist there",
    ),
    Refusal(
        SpecifierSet("==5.19.*"),
        "on this release EP cannot be asked for without tensor-parallel sharding of the dense layers (the flag "
        "keeps the default TP plan and there is no 'replicate' style), and every ep_dispatch_experts load is "
        "wrapped in FSDP2; DeepSpeed ZeRO-3 can own neither. 5.18 and 5.20+ work",
    ),
    Refusal(
        SpecifierSet(">=5.0,<5.6"),
        "expert parallelism is broken upstream in this release even without DeepSpeed: the loader is given "
        "model._tp_plan instead of the EP plan, so EP-only loads fail (KeyError) or leave experts unsharded",
    ),
)


def refusal_for(version: str) -> str | None:
    """Why `version` is refused outright, or None."""
    parsed = Version(version)
    return next((refusal.reason for refusal in REFUSED if parsed in refusal.releases), None)


def verified_range_text(releases: tuple[str, ...] = MATRIX_RELEASES) -> str:
    """The verified range `releases` (one per minor, oldest to newest; `verified.MATRIX_RELEASES`) declare, as a
    specifier in reading order (pyproject.toml states it so): every patch from the first minor's .0 to the end of
    the last minor, less the minors refused outright."""
    first, last = Version(releases[0]), Version(releases[-1])
    refused = [f"!={v.major}.{v.minor}.*" for v in map(Version, releases) if refusal_for(str(v))]
    return ",".join([f">={first.major}.{first.minor}.0", f"<{last.major}.{last.minor + 1}", *refused])


# The transformers releases the matrix (docs/support-matrix.md) verified, derived from the one declaration
# (`verified.MATRIX_RELEASES`); pyproject.toml states the same range (tests/unit/releases/test_declared_range.py).
VERIFIED_TRANSFORMERS = SpecifierSet(verified_range_text())
# CI's default release: the newest one the matrix verified.
CI_RELEASE = MATRIX_RELEASES[-1]


@dataclass(frozen=True)
class UpstreamDefect:
    """A release range where transformers' own EP is wrong for training, with or without this library.

    Loading (and inference) still works there and stays supported; DeepSpeed training of an EP model is refused
    with this reason, because the shim can make ZeRO-3 correct but cannot make transformers' gradients correct.
    Kept in step with the matrix (tests/unit/releases/test_support_table.py).
    """

    releases: SpecifierSet
    reason: str


UPSTREAM_TRAINING_DEFECTS = (
    UpstreamDefect(
        SpecifierSet(">=5.6.0,<5.17"),
        "transformers' expert-parallel backward is wrong on this release even without DeepSpeed: each rank's "
        "gradients of the router and of every weight before the last MoE layer only see its own experts "
        "(measured up to 0.48 on dense weights), and from 5.8 expert-bias gradients can hold uninitialised "
        "memory; training would be silently wrong. Loading and inference are fine. Train on transformers "
        "5.20 or newer (`python -m ep_ds_shim doctor` shows what was verified)",
    ),
)


def training_defect(version: str) -> str | None:
    """Why EP training is wrong upstream on `version`, or None."""
    parsed = Version(version)
    for defect in UPSTREAM_TRAINING_DEFECTS:
        if parsed in defect.releases:
            return defect.reason
    return None


def transformers_version() -> str:
    """The installed transformers release, read from the module currently imported as ``transformers`` (the
    package replaces its own entry in ``sys.modules`` when some of its lazy attributes are first used, so a
    reference kept from import time can be a stale object)."""
    return importlib.import_module("transformers").__version__


def support_hint() -> str:
    beyond = first_unverified()
    return (
        f"Supported transformers releases: {VERIFIED_TRANSFORMERS} (`python -m ep_ds_shim doctor` shows what was "
        "verified). "
        f"Install one of them, e.g. `pip install 'transformers>={beyond.major}.{beyond.minor - 1},<{beyond}'`."
    )


def allow_unverified_from_env() -> bool:
    return os.environ.get(ALLOW_UNVERIFIED_ENV, "").strip().lower() in ("1", "true", "yes")


def check_transformers(version: str, *, allow_unverified: bool = False) -> None:
    """Raise a clear `UnsupportedReleaseError` unless `version` is verified (or newer and opted in)."""
    refusal = refusal_for(version)
    if refusal is not None:
        raise UnsupportedReleaseError(f"transformers {version} is not supported by ep-ds-shim: {refusal}. {support_hint()}")
    parsed = Version(version)
    if parsed in VERIFIED_TRANSFORMERS:
        return
    if parsed < first_unverified() and not parsed.is_prerelease:
        raise UnsupportedReleaseError(f"transformers {version} is not a verified release. {support_hint()}")
    if not (allow_unverified or allow_unverified_from_env()):
        raise UnsupportedReleaseError(
            f"transformers {version} is newer than the last release ep-ds-shim verified ({VERIFIED_TRANSFORMERS}). "
            f"Check it on your own machines with `torchrun --nproc_per_node 2 -m ep_ds_shim verify` (a minute on "
            f"CPU), then opt in with ep_zero3_compat(allow_unverified=True) or {ALLOW_UNVERIFIED_ENV}=1 (the "
            "shape checks still run and refuse if the patched code changed), or pin a verified release."
        )


def first_unverified() -> Version:
    """The first release above the verified range (its exclusive upper bound)."""
    return max(Version(spec.version) for spec in VERIFIED_TRANSFORMERS if spec.operator.startswith("<"))


def check_deepspeed(version: str | None, *, allow_unverified: bool = False) -> None:
    """Refuse DeepSpeed releases outside the verified range (the DP x EP groups depend on its internals)."""
    if version is None:
        raise UnsupportedReleaseError(
            "DeepSpeed is not installed, but ZeRO-3 training needs it. "
            f"Install a verified release: pip install 'deepspeed{VERIFIED_DEEPSPEED}' (DS_BUILD_OPS=0 on CPU)."
        )
    if Version(version) in VERIFIED_DEEPSPEED or allow_unverified or allow_unverified_from_env():
        return
    raise UnsupportedReleaseError(
        f"DeepSpeed {version} is outside the verified range {VERIFIED_DEEPSPEED}. ep-ds-shim relies on how "
        "ZeRO-3 partitions parameters tagged as expert parameters (its AutoEP expert groups); install a verified release, or "
        f"pass allow_unverified=True / set {ALLOW_UNVERIFIED_ENV}=1 to try anyway (the integrity guard still runs)."
    )
