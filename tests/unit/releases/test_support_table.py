"""The declared support range (code, pyproject, README) and the generated matrix must agree."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ep_ds_shim.releases import support as _releases
from ep_ds_shim.releases import support_table as matrix

REPO = Path(__file__).resolve().parents[3]
MATRIX = matrix.load()
ROWS = MATRIX.get("releases", {})


def test_pyproject_declares_the_verified_ranges():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dependencies = {d.split(">")[0].split("<")[0].split("=")[0]: d for d in project["dependencies"]}
    assert SpecifierSet(dependencies["transformers"][len("transformers"):]) == _releases.VERIFIED_TRANSFORMERS
    assert SpecifierSet(dependencies["deepspeed"][len("deepspeed"):]) == _releases.VERIFIED_DEEPSPEED


def test_matrix_covers_every_minor_of_the_declared_range():
    assert ROWS, "ep_ds_shim/support_matrix.json has no rows: run `python tools/matrix.py run && ... render`"
    minors = {Version(v).release[:2] for v in ROWS}
    low = min(minors)
    high = max(minors)
    for minor in range(low[1], high[1] + 1):
        assert (5, minor) in minors, f"no matrix row for transformers 5.{minor}"
    # every row is inside the declared range or refused by the code, and the declared range ends where the rows end
    for release in ROWS:
        assert Version(release) in _releases.VERIFIED_TRANSFORMERS or _refused(release), release
    assert Version(f"{low[0]}.{low[1]}.0") in _releases.VERIFIED_TRANSFORMERS
    assert Version(f"{low[0]}.{low[1] - 1}.99") not in _releases.VERIFIED_TRANSFORMERS
    assert Version(f"{high[0]}.{high[1] + 1}.0") not in _releases.VERIFIED_TRANSFORMERS


def _lines():
    from ep_ds_shim.releases import lines  # imports transformers (the spellings): only where a row needs it

    return lines


def _refused(release: str) -> bool:
    return any(Version(release) in refusal.releases for refusal in _releases.REFUSED)


@pytest.mark.parametrize("release", sorted(ROWS, key=Version))
def test_each_row_supports_what_the_code_claims(release):
    row = ROWS[release]
    models = row["models"]
    assert len(models) >= 3, models
    if _refused(release):
        # the code refuses this release outright: the table must show it refused, and the range exclude it
        assert Version(release) not in _releases.VERIFIED_TRANSFORMERS
        for model, cells in models.items():
            assert all(c == matrix.REFUSED or c == matrix.NO_EP_PLAN for c in cells.values()), (release, model, cells)
        return
    with_plan = {m: c for m, c in models.items() if c["shape_checks"] != matrix.NO_EP_PLAN}
    assert with_plan, f"{release}: no model with an EP plan was run"
    for model, cells in with_plan.items():
        # the loading shim's own claims: shape checks and "EP + ZeRO-3 load == EP-only load", unless EP itself is
        # broken upstream for that model (then the table must say so)
        assert cells["shape_checks"] == matrix.PASS, (release, model, cells)
        assert cells["forward"] in (matrix.PASS, matrix.FAILS_UPSTREAM), (release, model, cells)
        expected_load = matrix.PASS if cells["forward"] == matrix.PASS else matrix.FAILS_UPSTREAM
        if cells["load_equals_ep_only"] == matrix.REFUSED:
            # the shim refuses this family's EP plan before the load (it splits dense weights, which ZeRO-3 cannot
            # carry): only where upstream's EP is wrong anyway, and the row's notes say why
            assert cells["forward"] == matrix.FAILS_UPSTREAM, (release, model, cells)
            assert any(n.startswith(f"{model} load_equals_ep_only") and "EPRequestError" in n
                       for n in row.get("notes", [])), (release, model, row.get("notes"))
            expected_load = matrix.REFUSED
        assert cells["load_equals_ep_only"] == expected_load, (release, model, cells)
        # the export of what the EP run holds reloads whole, wherever the EP load itself is right
        assert cells["export_reload"] == expected_load, (release, model, cells)
    assert any(c["forward"] == matrix.PASS for c in with_plan.values()), f"{release}: no model loads with EP"
    defect = _releases.training_defect(release)
    gradients_fail = any(c["gradients"] != matrix.PASS for c in with_plan.values())
    assert bool(defect) == gradients_fail, (
        f"{release}: the matrix says gradients {'fail' if gradients_fail else 'pass'} upstream, but "
        f"UPSTREAM_TRAINING_DEFECTS {'covers' if defect else 'does not cover'} it"
    )
    refused = _lines().training_refusal(release)  # upstream defects, and releases without the token dispatcher
    for model, cells in with_plan.items():
        expected = matrix.REFUSED if refused else matrix.PASS
        assert cells["zero3_step"] == expected, (release, model, cells)


def test_readme_links_the_generated_table():
    readme = (REPO / "README.md").read_text()
    assert "docs/support-matrix.md" in readme
    assert (REPO / "docs" / "support-matrix.md").exists()


def test_a_missing_table_is_a_loud_error(monkeypatch):
    """A wheel built without its package data must say so, not report "no row" for a verified release."""
    import pytest

    from ep_ds_shim.errors import EpShimError

    monkeypatch.setattr(matrix, "MATRIX_FILE", "no_such_file.json")
    matrix.load.cache_clear()
    try:
        with pytest.raises(EpShimError, match="missing from this installation"):
            matrix.row_for("5.24.0")
    finally:
        monkeypatch.undo()
        matrix.load.cache_clear()
