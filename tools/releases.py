"""The declared transformers releases, for run.sh and the matrix (the declaration: ep_ds_shim/releases/verified.py).

    python3 tools/releases.py ci-release       # CI's default release (system Python, nothing installed yet)
    python tools/releases.py install 5.25.0    # into this interpreter's environment, see `install`
    python tools/releases.py env               # `export VAR=VALUE` lines transformers needs to run here
    python tools/releases.py add 5.26.0        # move the declared range (and pyproject.toml's requirement) to it
    python tools/releases.py check             # pyproject.toml states the declared range (tests run it too)
    python tools/releases.py edge-rows         # the rows CI runs: each release line's oldest and newest release

`install`: transformers with its requirements; when the package index cannot satisfy them all (5.25 requires
kernels>=0.19.1, an index may top out below), transformers without them, then each requirement that can be had;
what stays unmet is named, and is fatal unless transformers runs without it behind a switch
(ep_ds_shim/releases/requirements.py; e.g. USE_HUB_KERNELS=0, which `env` prints for run.sh and the matrix applies).
An integration the replaced release required and this one declares another range for (kernels 0.19.1 from 5.25,
then 5.6) is removed, as a fresh install of the release would not have it.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DECLARATION = REPO / "ep_ds_shim" / "releases" / "verified.py"
PYPROJECT = REPO / "pyproject.toml"
NAME = "MATRIX_RELEASES"


def declared() -> tuple[str, ...]:
    """The declaration's releases, read as literals (no import: works before any environment exists)."""
    for node in ast.parse(DECLARATION.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == NAME for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise SystemExit(f"{DECLARATION}: no {NAME} = (...) found")


def _pip(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    return subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], env=env, capture_output=True,
                          text=True)


def install(release: str) -> int:
    """Install transformers==`release` here (see the module docstring). Exit status 1 when something it needs
    stays unmet without a switch."""
    sys.path.insert(0, str(REPO))  # the package's requirement reader, also before ep-ds-shim is installed
    from packaging.utils import canonicalize_name

    from ep_ds_shim.releases import requirements

    spec = f"transformers=={release}"
    before = requirements.applicable_requirements("transformers")  # what the release being replaced required
    brought_in = {canonicalize_name(r.name) for r in before[1]} if before else set()
    whole = _pip(spec)
    if whole.returncode:
        print(f"== {spec} with all its requirements cannot be installed from this package index; installing it "
              "without them, then each requirement that can be had", file=sys.stderr)
        alone = _pip("--no-deps", spec)
        if alone.returncode:
            raise SystemExit(f"pip install {spec} failed:\n{whole.stdout}{whole.stderr}{alone.stdout}{alone.stderr}")
        importlib.invalidate_caches()
        for unmet in requirements.unmet_requirements("transformers"):
            _pip(str(unmet.requirement))  # one at a time: the ones the index has go in
    importlib.invalidate_caches()
    # an integration the replaced release required (kernels 0.19.1 for 5.25) stays behind when this environment moves
    # to a release that only declares another range for it in an extra, and transformers imports it anyway: 5.6 then
    # fails every model import. A fresh install of this release has none of it, so the environment should not either.
    # (Only what the replaced release brought in: an integration installed for its own sake, torch say, is not ours.)
    for stale in requirements.integrations_out_of_range("transformers"):
        if stale.extra not in brought_in:  # `extra` is the integration's canonical name
            continue
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", stale.requirement.name], check=True)
        print(f"== removed {stale.requirement.name} {stale.found}: {stale.describe()}", file=sys.stderr)
    importlib.invalidate_caches()
    fatal = 0
    for unmet in requirements.unmet_requirements("transformers"):
        if unmet.switch is None:
            fatal = 1
            print(f"== UNMET {unmet.describe()}; no switch lets transformers run without it. {unmet.advice()}",
                  file=sys.stderr)
        else:
            print(f"== unmet: {unmet.describe()}; runs here with {unmet.switch.variable}={unmet.switch.off}",
                  file=sys.stderr)
    return fatal


def env() -> int:
    """`export VAR=VALUE` for each switch transformers needs here and the caller did not set (run.sh evals it)."""
    sys.path.insert(0, str(REPO))
    from ep_ds_shim.releases import requirements

    for unmet in requirements.unmet_requirements("transformers"):
        switch = unmet.switch
        if switch is not None and switch.variable not in os.environ:
            print(f"== {unmet.describe()}: running with {switch.variable}={switch.off}", file=sys.stderr)
            print(f"export {switch.variable}={switch.off}")
    return 0


def moved(releases: tuple[str, ...], release: str) -> tuple[str, ...]:
    """`releases` with `release` added: a newer patch replaces its minor's entry, a new minor is appended after the
    last one (the declaration is one release per minor, oldest to newest)."""
    from packaging.version import Version

    new = Version(release)
    if new.is_prerelease or len(new.release) != 3:
        raise SystemExit(f"{release}: give a final X.Y.Z release")
    last = Version(releases[-1])
    same_minor = [r for r in releases if Version(r).release[:2] == new.release[:2]]
    if same_minor:
        if Version(same_minor[0]) >= new:
            raise SystemExit(f"{release}: the declaration already runs {same_minor[0]} for {new.major}.{new.minor}")
        return tuple(release if r == same_minor[0] else r for r in releases)
    if new.release[:2] < last.release[:2]:
        raise SystemExit(f"{release}: older than the last declared minor ({releases[-1]}); the declaration only grows")
    if (new.major, new.minor) != (last.major, last.minor + 1):
        print(f"== note: {release} skips a minor after {releases[-1]}; the matrix will not cover the gap",
              file=sys.stderr)
    return (*releases, release)


def render_declaration(releases: tuple[str, ...]) -> str:
    """The declaration's tuple, wrapped like the rest of the code (120 columns)."""
    lines, line = [], "   "
    for item in releases:
        piece = f' "{item}",'
        if len(line) + len(piece) > 118:
            lines.append(line)
            line = "   "
        line += piece
    lines.append(line)
    return f"{NAME} = (\n" + "\n".join(lines) + "\n)"


def add(release: str) -> int:
    """Move the declaration to `release` and pyproject.toml's transformers requirement to the range it declares."""
    sys.path.insert(0, str(REPO))
    from ep_ds_shim.releases.support import verified_range_text

    releases = moved(declared(), release)
    text = DECLARATION.read_text()
    start = text.index(f"{NAME} = (")
    end = text.index(")", start) + 1
    DECLARATION.write_text(text[:start] + render_declaration(releases) + text[end:])
    spec = verified_range_text(releases)
    project = PYPROJECT.read_text()
    if len(PYPROJECT_LINE.findall(project)) != 1:
        raise SystemExit(f"{PYPROJECT}: expected exactly one transformers requirement line")
    PYPROJECT.write_text(PYPROJECT_LINE.sub(lambda m: f'{m.group(1)}"transformers{spec}",', project))
    print(f"declared releases: ... {', '.join(releases[-3:])} ({DECLARATION.relative_to(REPO)}); "
          f"pyproject.toml: transformers{spec}; CI's default release: {releases[-1]}")
    return 0


PYPROJECT_LINE = re.compile(r'^(\s*)"transformers([^"]*)",$', re.MULTILINE)


def range_problems(pyproject_text: str, releases: tuple[str, ...]) -> list[str]:
    """Where pyproject.toml's transformers requirement disagrees with the range `releases` declare."""
    sys.path.insert(0, str(REPO))
    from packaging.specifiers import SpecifierSet

    from ep_ds_shim.releases.support import verified_range_text

    found = PYPROJECT_LINE.findall(pyproject_text)
    if len(found) != 1:
        return [f"pyproject.toml: {len(found)} transformers requirement lines, expected one"]
    declared_range = verified_range_text(releases)
    if SpecifierSet(found[0][1]) != SpecifierSet(declared_range):
        return [f"pyproject.toml requires transformers{found[0][1]}, but {DECLARATION.relative_to(REPO)} declares "
                f"transformers{declared_range} (./run.sh add-release moves both; or fix pyproject.toml by hand)"]
    return []


def check() -> int:
    problems = range_problems(PYPROJECT.read_text(), declared())
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


def edge_rows(releases: tuple[str, ...]) -> tuple[str, ...]:
    """The oldest and the newest of `releases` on each release line, and every release on no line (refused
    outright). The shim's code differs between lines (ep_ds_shim/releases/lines.py), not inside one, so these rows
    exercise every path the shim has in CI's time budget; `./run.sh matrix-all` runs every declared row."""
    sys.path.insert(0, str(REPO))
    from packaging.version import Version

    from ep_ds_shim.releases.lines import RELEASE_LINES

    picked = set()
    for line in RELEASE_LINES:
        on_line = [r for r in releases if Version(r) in line.releases]
        picked.update(on_line[:1] + on_line[-1:])
    picked.update(r for r in releases if not any(Version(r) in line.releases for line in RELEASE_LINES))
    return tuple(r for r in releases if r in picked)


def main(argv: list[str]) -> int:
    command, *rest = argv or ["help"]
    if command == "ci-release" and not rest:
        print(declared()[-1])
        return 0
    if command == "install" and len(rest) == 1:
        return install(rest[0])
    if command == "env" and not rest:
        return env()
    if command == "add" and len(rest) == 1:
        return add(rest[0])
    if command == "check" and not rest:
        return check()
    if command == "edge-rows" and not rest:
        print(" ".join(edge_rows(declared())))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
