"""The verified transformers releases are declared once (ep_ds_shim/releases/verified.py); everything that states them
elsewhere is derived from it or checked here, and `./run.sh add-release`'s moves are checked on a copy."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ep_ds_shim.releases import support, support_table
from ep_ds_shim.releases.verified import MATRIX_RELEASES

REPO = Path(__file__).resolve().parents[3]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


releases_tool = _tool("releases")


def test_the_declaration_is_one_release_per_minor_oldest_to_newest():
    versions = [Version(v) for v in MATRIX_RELEASES]
    minors = [v.release[:2] for v in versions]
    assert minors == sorted(set(minors)), MATRIX_RELEASES
    assert all(len(v.release) == 3 and not v.is_prerelease for v in versions)
    assert support.refusal_for(MATRIX_RELEASES[-1]) is None, "CI's default release must not be a refused one"
    assert support.CI_RELEASE == MATRIX_RELEASES[-1]


def test_the_range_is_derived_from_the_declaration():
    first, last = Version(MATRIX_RELEASES[0]), Version(MATRIX_RELEASES[-1])
    verified = support.VERIFIED_TRANSFORMERS
    assert Version(f"{first.major}.{first.minor}.0") in verified
    assert Version(f"{first.major}.{first.minor - 1}.99") not in verified
    assert Version(f"{last.major}.{last.minor}.99") in verified
    assert Version(f"{last.major}.{last.minor + 1}.0") not in verified
    for release in MATRIX_RELEASES:
        assert (Version(release) in verified) == (support.refusal_for(release) is None), release


def test_tools_read_the_declaration_without_importing_it():
    assert releases_tool.declared() == MATRIX_RELEASES


def test_pyproject_states_the_declared_range():
    assert releases_tool.range_problems((REPO / "pyproject.toml").read_text(), MATRIX_RELEASES) == []


def test_a_pyproject_that_disagrees_is_named():
    text = (REPO / "pyproject.toml").read_text()
    first, last = Version(MATRIX_RELEASES[0]), Version(MATRIX_RELEASES[-1])
    stale = re.sub(r'"transformers[^"]*"', f'"transformers>={first.major}.{first.minor}.0,<{last.major}.{last.minor}"',
                   text)
    [problem] = releases_tool.range_problems(stale, MATRIX_RELEASES)
    assert "pyproject.toml requires transformers" in problem and "verified.py declares" in problem


def test_ci_installs_the_declared_release_not_a_second_pin():
    assert not re.search(r"^transformers", (REPO / "requirements" / "ci.txt").read_text(), re.MULTILINE)
    matrix = _tool_matrix()
    assert matrix.DEFAULT_RELEASES == list(MATRIX_RELEASES)
    assert matrix.pinned()["transformers"] == MATRIX_RELEASES[-1]


def _tool_matrix():
    sys.path.insert(0, str(REPO / "tools"))  # tools/matrix.py imports its sibling tools/releases.py
    try:
        return _tool("matrix")
    finally:
        sys.path.remove(str(REPO / "tools"))


def test_the_committed_table_has_a_row_for_every_declared_release():
    rows = support_table.load()["releases"]
    missing = [release for release in MATRIX_RELEASES if release not in rows]
    assert not missing, f"declared but never run: {missing} (./run.sh add-release runs and renders the row)"


@pytest.fixture
def repo_copy(tmp_path, monkeypatch):
    """The declaration and pyproject.toml copied, and the tool pointed at the copies."""
    for relative in ("ep_ds_shim/releases/verified.py", "pyproject.toml"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / relative, tmp_path / relative)
    monkeypatch.setattr(releases_tool, "DECLARATION", tmp_path / "ep_ds_shim/releases/verified.py")
    monkeypatch.setattr(releases_tool, "PYPROJECT", tmp_path / "pyproject.toml")
    monkeypatch.setattr(releases_tool, "REPO", tmp_path)
    return tmp_path


def test_add_release_moves_the_declaration_and_pyproject_together(repo_copy):
    last = Version(MATRIX_RELEASES[-1])
    next_minor = f"{last.major}.{last.minor + 1}.0"
    assert releases_tool.add(next_minor) == 0
    assert releases_tool.declared() == (*MATRIX_RELEASES, next_minor)
    assert releases_tool.range_problems((repo_copy / "pyproject.toml").read_text(), releases_tool.declared()) == []
    assert f"<{last.major}.{last.minor + 2}" in (repo_copy / "pyproject.toml").read_text()
    # the declaration file stays valid Python with the same literal
    namespace = {}
    exec((repo_copy / "ep_ds_shim/releases/verified.py").read_text(), namespace)  # noqa: S102
    assert namespace["MATRIX_RELEASES"] == releases_tool.declared()
    # a newer patch replaces its minor's entry; the range does not move
    patch = f"{last.major}.{last.minor + 1}.1"
    assert releases_tool.add(patch) == 0
    assert releases_tool.declared() == (*MATRIX_RELEASES, patch)


@pytest.mark.parametrize("release, message", [
    ("5.5.0", "older than the last declared minor"),
    (MATRIX_RELEASES[-1], "already runs"),
    ("5.99.0rc1", "final X.Y.Z"),
])
def test_add_release_refuses_what_would_not_be_a_move_forward(repo_copy, release, message):
    with pytest.raises(SystemExit, match=message):
        releases_tool.add(release)
    assert releases_tool.declared() == MATRIX_RELEASES


def test_the_rendered_table_states_the_declared_range():
    matrix = json.loads((REPO / "ep_ds_shim" / "releases" / "support_matrix.json").read_text())
    assert SpecifierSet(matrix.get("verified_transformers", "")) == support.VERIFIED_TRANSFORMERS, (
        "the table was rendered for another range: python tools/matrix.py render")
    assert f"`{support.verified_range_text()}`" in (REPO / "docs" / "support-matrix.md").read_text()


def test_ci_runs_every_release_lines_oldest_and_newest_row_and_every_refused_one():
    from ep_ds_shim.releases.lines import RELEASE_LINES

    edges = releases_tool.edge_rows(MATRIX_RELEASES)
    assert edges[-1] == MATRIX_RELEASES[-1], "CI's default release is a row CI runs"
    for line in RELEASE_LINES:
        on_line = [r for r in MATRIX_RELEASES if Version(r) in line.releases]
        assert not on_line or (on_line[0] in edges and on_line[-1] in edges), (line.name, edges)
        assert len([r for r in edges if Version(r) in line.releases]) <= 2, (line.name, edges)
    refused = [r for r in MATRIX_RELEASES if not any(Version(r) in line.releases for line in RELEASE_LINES)]
    assert set(refused) <= set(edges), edges
    # derived from the lines, not listed: an added release becomes its line's newest edge without touching the tool
    assert releases_tool.edge_rows(("5.20.0", "5.21.0", "5.22.0", "5.99.0")) == ("5.20.0", "5.22.0", "5.99.0")
