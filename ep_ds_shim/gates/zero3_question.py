"""The ZeRO-3 question itself: `is_deepspeed_zero3_enabled`, answered per call.

transformers imports the name into several modules separately (`modeling_utils`, `integrations.accelerate`,
...), and a function looks it up in *its own* module's namespace. The shim therefore wraps the binding in each
namespace a gate reads it from (derived from the gate function's `__globals__`), never only where it is
defined. The wrapper answers False only while a gated call of an EP load runs (`_state.hiding_zero3`);
everywhere else it returns what transformers would.
"""

from __future__ import annotations

import wrapt

from .._state import block_active, hiding_zero3

NAME = "is_deepspeed_zero3_enabled"


def _answer(wrapped, instance, args, kwargs):
    if hiding_zero3.get():
        return False
    return wrapped(*args, **kwargs)


def wrap_question(original):
    return wrapt.FunctionWrapper(original, _answer, enabled=block_active)
