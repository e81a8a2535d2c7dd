"""Small torch.distributed helpers the loading and training sides share."""

from __future__ import annotations

import datetime
import json
import os

import torch
import torch.distributed as dist

from .errors import CollectiveTimeoutError


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


def check_timeout() -> float:
    return float(os.environ.get(TIMEOUT_ENV, "") or DEFAULT_TIMEOUT)


def exchange(topic: str, payload: dict, *, ranks: tuple[int, ...] | None = None, what: str = "",
             timeout: float | None = None) -> dict[int, dict]:
    """All-gather a small JSON payload among `ranks` (default: every rank), through the process group's key-value
    store rather than a collective, so a rank that never arrives is reported by name after `check_timeout()`
    seconds (or `timeout`) (`CollectiveTimeoutError`) instead of hanging every other rank. Every rank of `ranks`
    must call it with the same `topic`, the same number of times."""
    world = dist.get_world_size()
    ranks = tuple(range(world)) if ranks is None else tuple(sorted(ranks))
    rank = dist.get_rank()
    round_key = (topic, ranks)
    _rounds[round_key] = _rounds.get(round_key, 0) + 1
    prefix = f"ep_ds_shim/{topic}/{'-'.join(map(str, ranks))}/{_rounds[round_key]}/"
    store = dist.distributed_c10d._get_default_store()
    store.set(prefix + str(rank), json.dumps(payload, sort_keys=True, default=str))
    keys = [prefix + str(r) for r in ranks]
    timeout = check_timeout() if timeout is None else timeout
    try:
        store.wait(keys, datetime.timedelta(seconds=timeout))
    except RuntimeError as error:  # the store's wait timed out (DistStoreError is a RuntimeError)
        missing = [r for r, key in zip(ranks, keys) if not store.check([key])]
        raise CollectiveTimeoutError(
            f"rank {rank}: ranks {missing} did not reach {what or topic} within {timeout:.0f} s ({TIMEOUT_ENV}). "
            "They never got to this point: typically they run different code (e.g. a from_pretrained without the EP "
            "arguments, or outside ep_zero3_compat), crashed, or are still busy. Every rank must make the same calls."
        ) from error
    return {r: json.loads(store.get(key)) for r, key in zip(ranks, keys)}
