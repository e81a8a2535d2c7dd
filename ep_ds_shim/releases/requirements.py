"""Whether the installed transformers' own requirements are met, and what to do when they are not.

An import does not show it: `pip install --no-deps`, a package index without a new enough dependency, or a later
install of another version leave transformers importable but broken. Measured: transformers 5.25 with `kernels`
missing or older than 0.19.1 imports fine, then ends *every* `from_pretrained` with `ValueError: Kernels are not
available` (5.25 turns hub kernels on by default), unless `USE_HUB_KERNELS` switches them off. The doctor reports
each unmet requirement (found, expected, what to do); the tests, the matrix and run.sh apply the switch where one
exists (docs/support-matrix.md says what that leaves unmeasured).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version


@dataclass(frozen=True)
class Switch:
    """An environment variable with which transformers runs without one of its requirements."""

    variable: str
    off: str  # the value that switches the feature off
    default_on: bool  # unset means on
    without_it: str  # what transformers does when the requirement is unmet and the feature is on
    when_on: str  # what ep-ds-shim measured with the feature on (the doctor says it when it is on)

    def is_off(self) -> bool:
        # transformers reads these with `is_env_variable_true`: only these spellings mean on
        value = os.environ.get(self.variable)
        if value is None:
            return not self.default_on
        return value.strip().lower() not in ("true", "1", "y", "yes", "on")


# Requirements transformers uses only behind a switch. kernels (5.25+): `use_kernels` defaults to on when
# USE_HUB_KERNELS is (default "YES"), and `set_use_kernels` raises at the end of the load when kernels is unusable.
SWITCHES = {
    "kernels": Switch(
        "USE_HUB_KERNELS", "0", default_on=True,
        without_it="every from_pretrained ends in `ValueError: Kernels are not available` (hub kernels are on by "
                   "default)",
        when_on="hub kernels are on: transformers kernelizes every model it loads and again on train(); ep-ds-shim "
                "measured this on CPU (kernels 0.19.1: no hub kernel for the CPU, every result equal to the "
                "single-process oracle), not on GPUs, where `python -m ep_ds_shim verify` checks it; nothing is "
                "refused for it",
    ),
}


@dataclass(frozen=True)
class Unmet:
    """One requirement of `distribution` the environment does not satisfy."""

    distribution: str
    distribution_version: str
    requirement: Requirement
    found: str | None  # the installed version, None when not installed
    # set for an integration installed outside the range of `distribution`'s extra of this name (see
    # `integrations_out_of_range`): installed, so it is imported, but not a requirement, so no switch applies
    extra: str | None = None

    @property
    def switch(self) -> Switch | None:
        return None if self.extra else SWITCHES.get(self.requirement.name.lower())

    @property
    def switched_off(self) -> bool:
        """The feature that needs it is switched off right now, so transformers works without it."""
        return self.switch is not None and self.switch.is_off()

    def describe(self) -> str:
        if self.extra:
            return (f"{self.requirement.name} {self.found} is installed, outside the range {self.distribution} "
                    f"{self.distribution_version} declares for it (its `{self.extra}` extra: {self.requirement}); "
                    f"{self.distribution} imports {self.requirement.name} whenever it is installed")
        found = "not installed" if self.found is None else f"{self.requirement.name} {self.found} is installed"
        return (f"{self.distribution} {self.distribution_version} requires {self.requirement} ({found})"
                + (f": {self.switch.without_it}" if self.switch and not self.switched_off else ""))

    def advice(self) -> str:
        todo = f"pip install '{self.requirement}'"
        if self.extra:  # either way out: the release then imports a version it declares, or none
            return f"pip uninstall -y {self.requirement.name}, or {todo}"
        if self.switch is None:
            return todo
        return (f"{todo}; where the package index has no such release, set {self.switch.variable}="
                f"{self.switch.off} instead (transformers then runs without {self.requirement.name}; that is how "
                "ep-ds-shim verified this release: `python -m ep_ds_shim doctor` shows its matrix row)")


def _declared(distribution: str) -> tuple[str, list[Requirement]] | None:
    """The installed `distribution`'s version and every requirement its metadata declares, extras included. None when
    it is not installed (the doctor reports that itself)."""
    try:
        own_version = metadata.version(distribution)
        texts = metadata.requires(distribution) or []
    except metadata.PackageNotFoundError:
        return None
    declared = []
    for text in texts:
        try:
            declared.append(Requirement(text))
        except InvalidRequirement:
            continue  # not ours to judge; pip would have refused it
    return own_version, declared


def _applies_here(requirement: Requirement) -> bool:
    """Unconditional, or its marker holds here without any extra."""
    return requirement.marker is None or requirement.marker.evaluate({"extra": ""})


def applicable_requirements(distribution: str) -> tuple[str, list[Requirement]] | None:
    """The installed `distribution`'s version and its requirements that apply here: unconditional ones, and those
    whose markers hold (no extras). None when it is not installed (the doctor reports that itself)."""
    found = _declared(distribution)
    if found is None:
        return None
    own_version, declared = found
    return own_version, [r for r in declared if _applies_here(r)]


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _satisfies(version: str | None, requirement: Requirement) -> bool:
    try:
        return version is not None and requirement.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def unmet_requirements(distribution: str = "transformers") -> list[Unmet]:
    """The requirements of the installed `distribution` that apply here and that the environment does not satisfy."""
    found = applicable_requirements(distribution)
    if found is None:
        return []
    own_version, requirements = found
    return [Unmet(distribution, own_version, requirement, _installed(requirement.name))
            for requirement in requirements if not _satisfies(_installed(requirement.name), requirement)]


def integrations_out_of_range(distribution: str = "transformers") -> list[Unmet]:
    """Packages installed beside `distribution` outside the range of its extra named after them (transformers 5.6.2's
    `kernels` extra asks for kernels<0.13,>=0.12.0). transformers imports such an integration whenever it is
    installed, so that range matters without the extra. Measured: kernels 0.19.1 (what 5.25 requires) beside
    transformers 5.6.2 ends every import of a model class in `ValueError: Either a revision or a version must be
    specified`, whatever USE_HUB_KERNELS says; found when one environment went from 5.25 back to 5.6."""
    found = _declared(distribution)
    if found is None:
        return []
    own_version, declared = found
    required = {canonicalize_name(r.name) for r in declared if _applies_here(r)}  # unmet_requirements reports those
    stale: dict[str, Unmet] = {}
    for requirement in declared:
        name = canonicalize_name(requirement.name)
        own_extra = requirement.marker is not None and requirement.marker.evaluate({"extra": name})
        if name in required or not own_extra:
            continue
        installed = _installed(requirement.name)
        if installed is not None and not _satisfies(installed, requirement):
            bare = Requirement(f"{requirement.name}{requirement.specifier}")  # without the extra's marker
            stale.setdefault(name, Unmet(distribution, own_version, bare, installed, extra=name))
    return list(stale.values())


def features_on(distribution: str = "transformers") -> list[str]:
    """What ep-ds-shim measured (or did not) for each switched feature that is usable and on right now."""
    found = applicable_requirements(distribution)
    if found is None:
        return []
    return [SWITCHES[r.name.lower()].when_on for r in found[1]
            if r.name.lower() in SWITCHES and _satisfies(_installed(r.name), r) and not SWITCHES[r.name.lower()].is_off()]


def switches_needed(distribution: str = "transformers") -> dict[str, str]:
    """The environment (variable -> value) with which `distribution` runs despite its unmet requirements, for the
    tools that run it here (run.sh, the tests, the matrix). Unmet requirements without a switch are not in it:
    `unmet_requirements` names them."""
    return {u.switch.variable: u.switch.off for u in unmet_requirements(distribution) if u.switch is not None}
