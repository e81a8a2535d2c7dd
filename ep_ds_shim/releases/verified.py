"""The one declaration of the transformers releases ep-ds-shim verified.

Everything else is derived from it or checked against it: the verified range (`support.VERIFIED_TRANSFORMERS`,
and so the doctor and every refusal), the matrix's default rows and CI's default release (tools/matrix.py,
tools/releases.py, run.sh), pyproject.toml's transformers requirement (rewritten by `./run.sh add-release`) and the
release facts the README states (both checked by tests/unit/releases/test_declared_range.py).

Literals only: tools/releases.py reads this file without importing the package (run.sh needs CI's default release
before any environment exists).
"""

# One release per minor, oldest to newest: the release the matrix runs for that minor (its newest patch when it was
# added). The verified range runs from the first minor's .0 to the last minor's last patch, less every minor that
# `support.REFUSED` refuses (their rows stay here, so the matrix keeps showing the refusal). The last one is CI's
# default release. `./run.sh add-release X.Y.Z` appends to (or, for a newer patch, updates) this tuple.
MATRIX_RELEASES = (
    "5.6.2", "5.7.0", "5.8.1", "5.9.0", "5.10.4", "5.11.0", "5.12.1", "5.13.1", "5.14.1", "5.15.1", "5.16.1",
    "5.17.0", "5.18.0", "5.19.0", "5.20.2", "5.21.1", "5.22.2", "5.23.0", "5.24.0", "5.25.0",
)
