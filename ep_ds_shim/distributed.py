"""Small torch.distributed helpers the loading and training sides share."""

from __future__ import annotations

import atexit
import datetime
import json
import os
import time

import torch
import torch.distributed as dist

from .errors import CollectiveTimeoutError, RankExitedError


def initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int | None:
    """The process group's world size, else the launcher's WORLD_SIZE, else None."""
    if initialised():
        return dist.get_world_size()
    env = os.environ.get("WORLD_SIZE")
    return int(env) if env else None


def default_device_type() -> str:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return accelerator.current_accelerator().type
    return "cpu"


# The library's own cross-rank checks wait at most this long for every rank to arrive (seconds).
TIMEOUT_ENV = "EP_DS_SHIM_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0  # torch's own default for a gloo process group
_rounds: dict[tuple, int] = {}
_EXITED = "ep_ds_shim/exited/"
_exit_marked: list = []  # [store, rank] this process marks its exit in
# Polling the store (`check`) rather than waiting on it in slices: a timed-out `wait` prints a C++ warning per slice.
_FIRST_POLL, _MAX_POLL = 0.0005, 0.2


def check_timeout() -> float:
    return float(os.environ.get(TIMEOUT_ENV, "") or DEFAULT_TIMEOUT)


def _mark_exit_at_interpreter_exit(store, rank: int) -> None:
    """Once this process takes part in an exchange, its normal end (the script returned, or raised) leaves a mark
    in the store, so ranks still waiting for it are told at once that it exited instead of waiting for the timeout.
    A rank killed by a signal leaves no mark; launchers such as torchrun then stop the others."""
    if not _exit_marked:
        atexit.register(_mark_exit)
    _exit_marked[:] = [store, rank]  # the store of the process group in use now


def _mark_exit() -> None:
    store, rank = _exit_marked
    try:
        store.set_timeout(datetime.timedelta(seconds=5))  # never hold up the exit on an unreachable store
        store.set(f"{_EXITED}{rank}", str(os.getpid()))
    except Exception:  # noqa: BLE001 - the store may be gone already (its host exited first); nothing to tell
        pass


def exchange(topic: str, payload: dict, *, ranks: tuple[int, ...] | None = None, what: str = "",
             timeout: float | None = None) -> dict[int, dict]:
    """All-gather a small JSON payload among `ranks` (default: every rank), through the process group's key-value
    store rather than a collective, so a rank that never arrives is reported by name after `check_timeout()`
    seconds (or `timeout`) (`CollectiveTimeoutError`) instead of hanging every other rank, and a rank whose process
    ended without arriving is reported by name at once (`RankExitedError`). Every rank of `ranks` must call it with
    the same `topic`, the same number of times."""
    world = dist.get_world_size()
    ranks = tuple(range(world)) if ranks is None else tuple(sorted(ranks))
    rank = dist.get_rank()
    round_key = (topic, ranks)
    _rounds[round_key] = _rounds.get(round_key, 0) + 1
    prefix = f"ep_ds_shim/{topic}/{'-'.join(map(str, ranks))}/{_rounds[round_key]}/"
    store = dist.distributed_c10d._get_default_store()
    _mark_exit_at_interpreter_exit(store, rank)
    store.set(prefix + str(rank), json.dumps(payload, sort_keys=True, default=str))
    keys = {r: prefix + str(r) for r in ranks}
    timeout = check_timeout() if timeout is None else timeout
    _wait_for(store, keys, rank, what or topic, timeout)
    return {r: json.loads(store.get(key)) for r, key in keys.items()}


def _wait_for(store, keys: dict[int, str], rank: int, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pause = _FIRST_POLL
    while not store.check(list(keys.values())):  # one round trip while everyone is there
        missing = [r for r, key in keys.items() if not store.check([key])]
        if not missing:  # arrived since
            continue
        exited = [r for r in missing if store.check([f"{_EXITED}{r}"])]
        if exited:
            raise RankExitedError(
                f"rank {rank}: ranks {exited} exited without reaching {what}: their processes ended (their script "
                "returned or raised) before this call. Every rank must make the same calls; check those ranks' "
                "output for an error, or a condition such as `if rank == 0:` around a call every rank must make."
            )
        if time.monotonic() >= deadline:
            raise CollectiveTimeoutError(
                f"rank {rank}: ranks {missing} did not reach {what} within {timeout:.0f} s ({TIMEOUT_ENV}). They never "
                "got to this point: typically they run different code (e.g. a call made under `if rank == 0:`, a "
                "from_pretrained without the EP arguments, or outside ep_zero3_compat), crashed, or are still busy. "
                "Every rank must make the same calls."
            )
        time.sleep(min(pause, max(deadline - time.monotonic(), 0.0)))
        pause = min(pause * 2, _MAX_POLL)


def arrive(topic: str, *, what: str, ranks: tuple[int, ...] | None = None) -> None:
    """Before a library call's first collective: wait (through the store, with the timeout) until every rank of
    `ranks` has made the same call, so a call made on some ranks only is an error naming the others, not a hang."""
    if initialised():
        exchange(f"arrive/{topic}", {}, ranks=ranks, what=what)
