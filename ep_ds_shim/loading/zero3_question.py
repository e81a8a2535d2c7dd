"""The ZeRO-3 question itself: `is_deepspeed_zero3_enabled`, answered per call.

transformers imports the name into several modules separately (`modeling_utils`, `integrations.accelerate`,
...), and a function looks it up in *its own* module's namespace. The shim therefore wraps the binding in each
namespace a gate reads it from (derived from the gate function's `__globals__`), never only where it is
defined. The wrapper answers False only while a gated call of an EP load runs (`context.hiding_zero3`);
everywhere else it returns what transformers would.
"""

from __future__ import annotations

import sys

from transformers.integrations import deepspeed as hf_deepspeed

from ..patching.targets import Target, underlying_function
from .gates.common import ZERO3_QUESTION
from .context import hiding_zero3


def answer(wrapped, instance, args, kwargs):
    if hiding_zero3.get():
        return False
    return wrapped(*args, **kwargs)


def zero3_signalled() -> bool:
    """What transformers itself answers, read from the defining module (which the shim never patches)."""
    return bool(hf_deepspeed.is_deepspeed_zero3_enabled())


def bindings(gate_raws) -> tuple[list[Target], list[str]]:
    """The module-level bindings of the question that the gate functions (`gate_raws`: their raw descriptors)
    read, as targets; plus a problem for each binding that is not transformers' own function."""
    defining = getattr(hf_deepspeed, ZERO3_QUESTION)
    targets: list[Target] = []
    problems: list[str] = []
    seen: set[str] = set()
    for raw in gate_raws:
        function = underlying_function(raw)
        module = sys.modules.get(function.__module__)
        if module is None or vars(module) is not function.__globals__:
            problems.append(f"{function.__qualname__}: cannot find the module whose namespace it reads")
            continue
        if module.__name__ in seen:  # several gates read the same namespace: one binding, one report
            continue
        seen.add(module.__name__)
        bound = vars(module).get(ZERO3_QUESTION)
        if bound is not defining:
            problems.append(
                f"{module.__name__}.{ZERO3_QUESTION} is {bound!r}, not the function transformers defines in "
                "transformers.integrations.deepspeed: another library wrapped or replaced it"
            )
            continue
        targets.append(Target(module.__name__, ZERO3_QUESTION, "function"))
    return targets, problems
