"""Release lines: a line's name is read from its range (one place), and docs/design.md's release table names
exactly the lines and the refusals the code has."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.specifiers import SpecifierSet

from ep_ds_shim.releases.lines import RELEASE_LINES, ReleaseLine
from ep_ds_shim.releases.spelling import FlagWithTpSize
from ep_ds_shim.releases.support import refusal_for

DESIGN = (Path(__file__).resolve().parents[3] / "docs" / "design.md").read_text()


def test_a_line_is_named_by_its_range():
    assert ReleaseLine(SpecifierSet(">=5.6.0,<5.15"), FlagWithTpSize()).name == "5.6-5.14"
    assert ReleaseLine(SpecifierSet("<5.19,>=5.15.0"), FlagWithTpSize()).name == "5.15-5.18"
    assert ReleaseLine(SpecifierSet(">=5.23.0"), FlagWithTpSize()).name == "5.23+"
    assert [line.name for line in RELEASE_LINES] == ["5.6-5.14", "5.15-5.18", "5.20-5.22", "5.23+"]


def _release_rows() -> list[tuple[str, str]]:
    section = DESIGN[DESIGN.index("## Releases"):]
    section = section[: section.index("\n## ")]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.match(r"\d", cells[0]):
            rows.append((cells[0], cells[2]))
    return rows


def _first_release(row: str) -> str:
    first = re.match(r"(\d+)(?:\.(\d+))?", row)
    return f"{first.group(1)}.{first.group(2) or 0}.0"


def test_the_design_release_table_is_the_code():
    rows = _release_rows()
    lines = [(releases, handled) for releases, handled in rows if handled.startswith("line ")]
    assert lines == [(line.name, f"line {line.name}") for line in RELEASE_LINES]
    for releases, handled in rows:
        refused = refusal_for(_first_release(releases)) is not None
        assert refused == (handled == "refused"), (releases, handled)
