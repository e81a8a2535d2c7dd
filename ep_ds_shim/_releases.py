"""Which transformers / DeepSpeed releases the shim handles, and how each range asks for expert parallelism.

The registry is keyed by `packaging` specifiers. A version decides the *strategy*; the shape checks in
`_targets.py` then decide whether the installed code still looks like what that strategy was verified on.
A version number alone is never enough to patch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from .errors import UnsupportedReleaseError

# The transformers releases the matrix (docs/support-matrix.md) verified, oldest to newest. Keep in step with
# pyproject.toml's dependency range and with the generated table; tests/unit/test_support_table.py checks it.
VERIFIED_TRANSFORMERS = SpecifierSet(">=5.6.0,<5.24,!=5.19.*")
VERIFIED_DEEPSPEED = SpecifierSet(">=0.19.0,<0.20")

# Opting in to a transformers release newer than the last verified one. The shape checks still run.
ALLOW_UNVERIFIED_ENV = "EP_DS_SHIM_ALLOW_UNVERIFIED"


@dataclass(frozen=True)
class Family:
    """A run of releases that ask for EP the same way.

    ``spelling`` names how `DistributedConfig` requests EP of size N (see `spelling.py`); ``dtensor_experts``
    says whether expert weights come back as DTensors (DeepSpeed cannot partition those).
    """

    name: str
    releases: SpecifierSet
    spelling: str
    dtensor_experts: bool
    notes: str = ""
    # How a DP x EP load (world > ep) reaches the EP sub-group: "replicate_dim" (gates/ep_mesh.py sizes the
    # release's own mesh); None: refused with a clear error.
    dp_x_ep: str | None = None
    # DistributedConfig(enable_expert_parallel=True) alone resolves to ep_size=1 (EP silently off).
    legacy_flag_silently_off: bool = False
    # The experts' EP hook all-reduces their output only while the expert weights are DTensors
    # (`MoeExpertsParallel.transform_output_post_forward`); once they are local tensors for DeepSpeed, the shim
    # attaches that same all-reduce to the experts module (zero3.py).
    expert_output_reduce_needs_dtensors: bool = False


FAMILIES = (
    Family(
        "5.6-5.14", SpecifierSet(">=5.6.0,<5.15"), "enable_expert_parallel+device_mesh", False,
        "EP via DistributedConfig(enable_expert_parallel=True) and device_mesh=; plain-tensor expert shards. "
        "(A DP x EP load over device_mesh=mesh['ep'] works upstream, but training is refused here and the shim has "
        "not verified it, so world > ep is refused.)",
    ),
    Family(
        "5.15-5.18", SpecifierSet(">=5.15.0,<5.19"), "enable_expert_parallel+tp_size", True,
        "DistributedMixin; the flag alone raises TypeError, tp_size=N is required; from 5.16 DTensor experts.",
        expert_output_reduce_needs_dtensors=True,
    ),
    Family(
        "5.20-5.22", SpecifierSet(">=5.20.0,<5.23"), "enable_expert_parallel+tp_size", True,
        "ep_size and a mesh manager; with tp_size=N the flag also empties the TP plan (dense layers stay whole); "
        "the flag alone silently leaves EP off.",
        legacy_flag_silently_off=True,
    ),
    Family(
        "5.23+", SpecifierSet(">=5.23.0"), "ep_size", True,
        "ep_size=N with tp_size=N; the legacy flag alone means ep_size=1 (FutureWarning).",
        dp_x_ep="replicate_dim",
        legacy_flag_silently_off=True,
    ),
)


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


@dataclass(frozen=True)
class UpstreamDefect:
    """A release range where transformers' own EP is wrong for training, with or without this library.

    Loading (and inference) still works there and stays supported; DeepSpeed training of an EP model is refused
    with this reason, because the shim can make ZeRO-3 correct but cannot make transformers' gradients correct.
    Kept in step with the matrix (tests/unit/test_support_table.py).
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
        "5.17, 5.18 or >=5.20 (see docs/support-matrix.md)",
    ),
)


def training_defect(version: str) -> str | None:
    """Why EP training is wrong upstream on `version`, or None."""
    parsed = Version(version)
    for defect in UPSTREAM_TRAINING_DEFECTS:
        if parsed in defect.releases:
            return defect.reason
    return None


def refuse_training_if_defective() -> None:
    import transformers

    reason = training_defect(transformers.__version__)
    if reason is not None:
        raise UnsupportedReleaseError(f"transformers {transformers.__version__}: {reason}.")


def _support_hint() -> str:
    return (
        f"Supported transformers releases: {VERIFIED_TRANSFORMERS} (see docs/support-matrix.md). "
        "Install one of them, e.g. `pip install 'transformers>=5.23,<5.24'`."
    )


def allow_unverified_from_env() -> bool:
    return os.environ.get(ALLOW_UNVERIFIED_ENV, "").strip().lower() in ("1", "true", "yes")


def family_for(version: str, *, allow_unverified: bool = False) -> Family:
    """The family whose strategy applies to `version`, or a clear `UnsupportedReleaseError`."""
    parsed = Version(version)
    for refusal in REFUSED:
        if parsed in refusal.releases:
            raise UnsupportedReleaseError(
                f"transformers {version} is not supported by ep-ds-shim: {refusal.reason}. {_support_hint()}"
            )
    if parsed not in VERIFIED_TRANSFORMERS:
        newest = max(Version(spec.version) for spec in VERIFIED_TRANSFORMERS if spec.operator.startswith("<"))
        if parsed < newest and not parsed.is_prerelease:
            raise UnsupportedReleaseError(f"transformers {version} is not a verified release. {_support_hint()}")
        if not allow_unverified:
            raise UnsupportedReleaseError(
                f"transformers {version} is newer than the last release ep-ds-shim verified ({VERIFIED_TRANSFORMERS}). "
                f"Pin a verified release, or opt in with ep_zero3_compat(allow_unverified=True) or "
                f"{ALLOW_UNVERIFIED_ENV}=1: the shape checks still run and refuse if the patched code changed."
            )
    for family in FAMILIES:
        if parsed in family.releases:
            return family
    raise UnsupportedReleaseError(f"transformers {version}: no strategy covers it. {_support_hint()}")


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
        "ZeRO-3 picks its data-parallel and model-parallel groups from `mpu`; install a verified release, or "
        f"pass allow_unverified=True / set {ALLOW_UNVERIFIED_ENV}=1 to try anyway (the integrity guard still runs)."
    )
