"""What a ZeRO-3 gate is, and the one wrapper every gate gets."""

from __future__ import annotations

from dataclasses import dataclass

from ...patching.targets import Target
from ..context import acting_load, hidden_zero3

ZERO3_QUESTION = "is_deepspeed_zero3_enabled"

# Names whose presence next to the ZeRO-3 question means upstream already decides per load whether EP wants the
# standard path (what transformers PR #45548 does). Matched against the gate code's looked-up names.
EP_AWARENESS_MARKERS = ("expert_parallel", "ep_size", "ep_plan", "distributed_config", "is_ep")


@dataclass(frozen=True)
class Gate:
    """A transformers call that branches on the ZeRO-3 question: what it does under ZeRO-3 upstream, and what an
    EP load needs instead (the README's gate table is checked against these texts)."""

    name: str
    target: Target
    upstream_under_zero3: str
    with_shim: str


def gate_target(owner: str, name: str, kind: str, params: tuple[str, ...],
                *other_params: tuple[str, ...]) -> Target:
    """A gate's target: besides its shape (`params`, or one of `other_params`: spellings verified on other
    releases), it must still ask the ZeRO-3 question."""
    return Target(owner, name, kind, params=params, other_params=other_params, must_look_up=ZERO3_QUESTION,
                  awareness_markers=EP_AWARENESS_MARKERS)


def run_gate(gate: Gate):
    """The wrapt wrapper of `gate`: for an EP load under ZeRO-3, the gated call runs with the question answering
    False, so the release takes its own standard branch; every other call runs untouched."""

    def wrapper(wrapped, instance, args, kwargs):
        load = acting_load()
        if load is None:
            return wrapped(*args, **kwargs)
        load.took(gate.name)
        with hidden_zero3():
            return wrapped(*args, **kwargs)

    return wrapper
