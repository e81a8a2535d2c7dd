"""Ranks agree before anything irreversible: each reports its problem (or None), and if any rank has one, every rank
raises the same error naming the ranks and what each found."""

from __future__ import annotations

from ...distributed import exchange

# After a long write (a checkpoint, a conversion) a fast rank waits for the slowest one. A rank that dies ends the
# job through the launcher, so this wait is bounded only generously.
AFTER_WRITE_TIMEOUT = 24 * 3600.0


def agree(topic: str, problem: str | None, *, what: str, error: type[Exception], prefix: str = "",
          payload: dict | None = None, timeout: float | None = None) -> dict[int, dict]:
    """Exchange `payload` plus this rank's `problem`; raise `error(prefix + summary)` on every rank if any rank has a
    problem. Returns every rank's payload."""
    outcomes = exchange(topic, {**(payload or {}), "problem": problem}, what=what, timeout=timeout)
    problems = {rank: outcome["problem"] for rank, outcome in outcomes.items() if outcome["problem"]}
    if problems:
        raise error(prefix + summary(problems))
    return outcomes


def summary(problems: dict[int, str]) -> str:
    """'rank 1: X' or 'ranks [0, 1]: X; rank 2: Y' (ranks grouped by message)."""
    by_message: dict[str, list[int]] = {}
    for rank, message in sorted(problems.items()):
        by_message.setdefault(message, []).append(rank)
    return "; ".join((f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}") + f": {message}"
                     for message, ranks in by_message.items())


def described(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
