"""One outcome for every rank of a save that one rank writes (`EPTrainer.save_model`)."""

from __future__ import annotations

from ...distributed import exchange
from ...errors import EpShimError

# Writing a large model can take long on the writing rank while the others wait for its outcome; a rank that dies
# ends the job through the launcher anyway, so this wait is bounded only generously.
WRITE_TIMEOUT = 24 * 3600.0


def agree_on_outcome(error: str | None, what: str) -> None:
    """Every rank raises the same error if any rank's part failed, so none is left waiting in a collective."""
    outcomes = exchange("save_outcome", {"error": error}, what=what, timeout=WRITE_TIMEOUT)
    failed = {rank: outcome["error"] for rank, outcome in outcomes.items() if outcome["error"]}
    if failed:
        rank, message = next(iter(sorted(failed.items())))
        raise EpShimError(f"{what} failed on rank(s) {sorted(failed)}; nothing usable was written. Rank {rank}: {message}")
