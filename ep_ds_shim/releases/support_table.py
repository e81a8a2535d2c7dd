"""The support matrix CI measures on real releases (`support_matrix.json`, shipped as package data; rendered to
docs/support-matrix.md by tools/matrix.py). The doctor reads it to say what was verified for a release, and
tools/matrix.py writes its cells with the names below."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from ..errors import EpShimError

MATRIX_FILE = "support_matrix.json"

# What a cell of a row can say (tools/matrix.py writes them; the doctor and the tests read them).
PASS = "pass"
FAIL = "fail"
FAILS_UPSTREAM = "fails upstream"  # transformers' own EP is wrong there, with or without this library
REFUSED = "refused"  # the library raises a clear error instead (the reason is in the row's notes)
NO_EP_PLAN = "n/a (no EP plan in this release)"
CRASHED = "not run (worker crashed)"

# The columns of a row, in order: what each one checks is described in docs/support-matrix.md.
COLUMNS = ("shape_checks", "load_equals_ep_only", "forward", "gradients", "zero3_step", "export_reload")


@lru_cache(maxsize=1)
def load() -> dict:
    """The committed matrix. Missing package data is a broken install, not "no row": say so."""
    try:
        text = resources.files(__package__).joinpath(MATRIX_FILE).read_text()
    except FileNotFoundError as error:
        raise EpShimError(
            f"{__package__}/{MATRIX_FILE} is missing from this installation of ep-ds-shim (a wheel built without its "
            "package data?). Reinstall ep-ds-shim from a release or a full checkout."
        ) from error
    return json.loads(text)


def row_for(version: str) -> dict | None:
    """The matrix row of `version`, or None when the matrix never ran it."""
    return load()["releases"].get(version)
