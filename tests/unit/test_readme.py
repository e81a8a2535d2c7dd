"""The README states what the code does: its gate table is the registry's, and its architecture section names every
module of the package."""

from __future__ import annotations

import re
from pathlib import Path

import ep_ds_shim
from ep_ds_shim.patch_registry import GATES

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def test_gate_table_is_the_registry():
    rows = {}
    for line in section("What the block does (loading)").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[0] != "`gate`":
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    assert rows == {gate.name: (gate.upstream_under_zero3, gate.with_shim) for gate in GATES}


def test_architecture_names_every_module():
    tree = section("Architecture")
    package = Path(ep_ds_shim.__file__).parent
    missing = [str(path.relative_to(package)) for path in package.rglob("*.py")
               if path.name != "__init__.py" and not re.search(rf"\b{re.escape(path.name)}", tree)]
    assert not missing, f"README Architecture does not mention: {missing}"


def test_release_facts_follow_the_declaration():
    """Where the README states the verified transformers range, it is the one ep_ds_shim/releases/verified.py
    declares (after `./run.sh add-release`, these are the lines to edit)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    from ep_ds_shim.releases.support import VERIFIED_TRANSFORMERS
    from ep_ds_shim.releases.verified import MATRIX_RELEASES

    first, last = Version(MATRIX_RELEASES[0]), Version(MATRIX_RELEASES[-1])
    span = f"{first.major}.{first.minor}-{last.major}.{last.minor}"
    stated = re.findall(r"\b(\d+\.\d+-\d+\.\d+) verified\b", README)
    assert stated and set(stated) == {span}, f"README states {stated}, the declaration {span} verified"
    rows = re.findall(r"^\| [\d.]+ – (\d+\.\d+) \| verified", section("Supported releases"), re.MULTILINE)
    assert max(map(Version, rows)) == Version(f"{last.major}.{last.minor}"), (
        f"the Supported releases table's newest verified row ends at {max(rows, key=Version)}, the declaration at "
        f"{last.major}.{last.minor}")
    doctor_sample = re.search(r"verified: transformers (\S+), deepspeed", section("Doctor"))
    assert SpecifierSet(doctor_sample.group(1)) == VERIFIED_TRANSFORMERS, doctor_sample.group(0)
