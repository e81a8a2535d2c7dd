"""The README is for users and cannot drift: its quickstart is examples/quickstart.py word for word (a distributed test
runs the README's own block), it stays short and in its order, it names the CPU wheel index, and every file it links
exists. The moved depth stays tied to the code too: docs/architecture.md's gate table is the registry's, and it names
every module of the package."""

from __future__ import annotations

import re
from pathlib import Path

import ep_ds_shim
from ep_ds_shim.patch_registry import GATES

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
ARCHITECTURE = (REPO / "docs" / "architecture.md").read_text()


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def test_quickstart_block_is_the_example_word_for_word():
    [block] = code_blocks(section(README, "Quickstart"), "python")
    assert block == (REPO / "examples" / "quickstart.py").read_text()


def test_readme_is_short_and_in_the_users_order():
    assert len(README.splitlines()) <= 260
    titles = re.findall(r"^## (.+)$", README, flags=re.M)
    assert titles[:3] == ["Install", "Quickstart", "Launchers"], titles
    assert titles.index("Supported releases") > titles.index("Launchers") and titles[-1] == "More"
    assert len(README[: README.index("## Install")].splitlines()) <= 25


def test_install_names_the_cpu_wheel_index_and_torch_first():
    install = section(README, "Install")
    [commands, checks] = code_blocks(install, "bash")[:2]
    lines = [line for line in commands.splitlines() if line.startswith("pip install")]
    assert "--index-url https://download.pytorch.org/whl/cpu" in lines[0] and lines[0].startswith("pip install torch==")
    assert lines[-1].startswith("pip install ep-ds-shim")
    assert "python -m ep_ds_shim doctor" in checks and "-m ep_ds_shim verify" in checks


def test_every_linked_file_exists():
    for page, text in (("README.md", README), *((p.name, p.read_text()) for p in (REPO / "docs").glob("*.md")),
                       ("CONTRIBUTING.md", (REPO / "CONTRIBUTING.md").read_text())):
        base = REPO if page in ("README.md", "CONTRIBUTING.md") else REPO / "docs"
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (base / target).exists(), f"{page} links to {target}, which does not exist"


def test_gate_table_is_the_registry():
    rows = {}
    for line in section(ARCHITECTURE, "What the block does (loading)").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[0] != "`gate`":
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    assert rows == {gate.name: (gate.upstream_under_zero3, gate.with_shim) for gate in GATES}


def test_architecture_names_every_module():
    tree = section(ARCHITECTURE, "The package, module by module")
    package = Path(ep_ds_shim.__file__).parent
    missing = [str(path.relative_to(package)) for path in package.rglob("*.py")
               if path.name != "__init__.py" and not re.search(rf"\b{re.escape(path.name)}", tree)]
    assert not missing, f"docs/architecture.md does not mention: {missing}"


def test_release_facts_follow_the_declaration():
    """The newest verified row of the README's release table ends at the newest release
    ep_ds_shim/releases/verified.py declares (after `./run.sh add-release`, it is the line to edit)."""
    from packaging.version import Version

    from ep_ds_shim.releases.verified import MATRIX_RELEASES

    last = Version(MATRIX_RELEASES[-1])
    rows = re.findall(r"^\| [\d.]+ – (\d+\.\d+) \| verified", section(README, "Supported releases"), re.MULTILINE)
    assert rows and max(map(Version, rows)) == Version(f"{last.major}.{last.minor}"), (
        f"the README's newest verified row ends at {rows}, the declaration at {last.major}.{last.minor}")
