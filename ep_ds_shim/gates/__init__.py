"""The five ZeRO-3 gates inside `from_pretrained`, one module each.

Every gate is a transformers function that branches on `is_deepspeed_zero3_enabled()`. For an EP load while
ZeRO-3 is signalled, the shim makes that question answer False for the duration of the gated call only, so the
release runs its *own* standard (non-ZeRO-3) branch there, exactly as an EP-only load would. No transformers
code is copied: the gate modules only name the target and say why.
"""

from __future__ import annotations

from dataclasses import dataclass

import wrapt

from .._state import block_active, current_load, hidden_zero3
from .._targets import Target


@dataclass(frozen=True)
class Gate:
    """A gated transformers call: what it does under ZeRO-3 upstream, and what EP needs instead."""

    name: str
    target: Target
    upstream_under_zero3: str
    standard_path: str


def gate_wrapper(gate: Gate):
    """A wrapt wrapper that runs the gated call with the ZeRO-3 question hidden, for EP loads only."""

    def run_gate(wrapped, instance, args, kwargs):
        load = current_load.get()
        if load is None or not load.acts:
            return wrapped(*args, **kwargs)
        if gate.name not in load.gates_taken:
            load.gates_taken.append(gate.name)
        with hidden_zero3():
            return wrapped(*args, **kwargs)

    return run_gate


def wrap_gate(gate: Gate, original):
    return wrapt.FunctionWrapper(original, gate_wrapper(gate), enabled=block_active)


def all_gates() -> tuple[Gate, ...]:
    from . import device_map, init_context, loader, missing_keys_init, missing_keys_to_device

    return (init_context.GATE, device_map.GATE, loader.GATE, missing_keys_to_device.GATE, missing_keys_init.GATE)
