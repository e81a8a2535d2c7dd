"""Read the support matrix that CI generates from real runs (`support_matrix.json`, rendered to
docs/support-matrix.md by tools/matrix.py). The doctor uses it to say what was verified for a release."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

MATRIX_FILE = Path(__file__).with_name("support_matrix.json")

# What each cell of a row can say.
PASS, FAIL, UPSTREAM, NOT_APPLICABLE, NOT_RUN = "pass", "fail", "fails upstream", "n/a", "not run"
COLUMNS = ("shape_checks", "load_equals_ep_only", "forward", "gradients", "zero3_step")


@lru_cache(maxsize=1)
def load() -> dict:
    if not MATRIX_FILE.exists():
        return {"releases": {}}
    return json.loads(MATRIX_FILE.read_text())


def row_for(version: str) -> dict | None:
    return load()["releases"].get(version)
