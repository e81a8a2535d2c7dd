"""Direct timers of the shim's own work, installed in a benchmark worker process only (the library is unchanged).

Every wrapper the loading block installs (the `from_pretrained` entry, the ZeRO-3 gates, the ZeRO-3 question, the
mesh sizing) is replaced, in `ep_ds_shim.loading.patches.POINTS`, by a timed copy that measures its *self* time:
its total time minus the time spent in the transformers function it wraps. Named internals are timed as well
(inclusive): the request checks, the cross-rank agreement, the post-load work (loaded-model check, record +
fingerprints, DeepSpeed-readiness) and the integrity check. The sum of the wrappers' self times, plus entering and
leaving the block, is all the time the shim adds to a load: the cross-check of the measured load-time ratio.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import defaultdict

_totals: dict[str, float] = defaultdict(float)
_cpu_totals: dict[str, float] = defaultdict(float)
_calls: dict[str, int] = defaultdict(int)
_installed = False


def add(name: str, seconds: float, cpu_seconds: float | None = None) -> None:
    _totals[name] += seconds
    _calls[name] += 1
    if cpu_seconds is not None:
        _cpu_totals[name] += cpu_seconds


def take() -> dict[str, dict]:
    """Everything measured since the last `take` ({name: {"s": seconds, "calls": n[, "cpu_s": this thread's CPU
    seconds]}}), and reset. CPU time is what the work costs even when the rank waits for a core (4 ranks on 2)."""
    out = {name: {"s": _totals[name], "calls": _calls[name]} for name in _totals}
    for name, cpu_seconds in _cpu_totals.items():
        out[name]["cpu_s"] = cpu_seconds
    _totals.clear()
    _cpu_totals.clear()
    _calls.clear()
    return out


def _self_timed(name: str, wrapper):
    """A wrapt wrapper that records its own time minus the wrapped function's."""

    @functools.wraps(wrapper)
    def timed(wrapped, instance, args, kwargs):
        inner = 0.0

        def inner_wrapped(*a, **k):
            nonlocal inner
            started = time.perf_counter()
            try:
                return wrapped(*a, **k)
            finally:
                inner += time.perf_counter() - started

        started = time.perf_counter()
        try:
            return wrapper(inner_wrapped, instance, args, kwargs)
        finally:
            add(f"self: {name}", time.perf_counter() - started - inner)

    return timed


def _inclusive(module, attribute: str, name: str) -> None:
    original = getattr(module, attribute)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        started, cpu_started = time.perf_counter(), time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            add(name, time.perf_counter() - started, time.thread_time() - cpu_started)

    setattr(module, attribute, timed)


def install() -> None:
    """Idempotent. Call before the first `ep_zero3_compat` block opens (wrappers are read when it installs)."""
    global _installed
    if _installed:
        return
    _installed = True
    from ep_ds_shim import experts, rank_agreement
    from ep_ds_shim.loading import entry, patches
    from ep_ds_shim.training import deepspeed_ready, guard

    patches.POINTS = tuple(
        dataclasses.replace(point, wrapper=_self_timed(f"{point.role} {point.name}", point.wrapper))
        for point in patches.POINTS
    )
    # inclusive timers of named internals (each is inside one wrapper's self time, or called by the user)
    _inclusive(entry, "validate_request", "validate_request")
    _inclusive(rank_agreement, "check_load_request", "check_load_request (cross-rank agreement)")
    _inclusive(entry, "_after_ep_load", "_after_ep_load")
    _inclusive(entry, "check_loaded_model", "check_loaded_model")
    _inclusive(deepspeed_ready, "record_ep_load", "record_ep_load")
    _inclusive(deepspeed_ready, "make_deepspeed_ready", "make_deepspeed_ready")
    _inclusive(experts, "fingerprints", "fingerprints")
    _inclusive(guard, "verify_expert_integrity", "verify_expert_integrity")
    # the export's steps (ep_ds_shim.training.export): transfers, conversion, writing, verification and the move
    from ep_ds_shim.training.export import gather, plan, stream, target, write

    _inclusive(plan, "build_plan", "export: plan")
    _inclusive(gather, "bring", "export: transfers")
    _inclusive(write, "convert", "export: conversion")
    _inclusive(write, "write_shard", "export: writing")
    _inclusive(write, "verify", "export: verification")
    _inclusive(target.Staging, "commit", "export: move into place")
    _inclusive(stream, "write_config", "export: config")


def shim_self_seconds(timers: dict) -> float:
    """The shim's whole own time in a load: the wrappers' self times (+ the block, recorded by the worker)."""
    return sum(v["s"] for k, v in timers.items() if k.startswith("self: ") or k.startswith("block "))
