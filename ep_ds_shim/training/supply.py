"""The `deepspeed.initialize` wrapper behind `supply_deepspeed_groups`.

`accelerate`'s `Accelerator.prepare` and the transformers `Trainer` (through accelerate) call
`deepspeed.initialize` themselves. Inside the block, a call whose model is an EP model the shim loaded goes through
the library's hand-over (`handover.py`): the checks before, DeepSpeed's expert groups built inside it, the checks
after. Other calls pass through untouched. Nothing about the call changes: DeepSpeed's data-parallel group is every
rank, as launchers already assume (their `train_batch_size` counts every rank).
"""

from __future__ import annotations

import inspect

from ..log import logger
from ..patching.targets import Target
from . import handover
from .record import record_of
from .state import GROUPS

TARGET = Target("deepspeed", "initialize", "function", leading_params=("args", "model", "optimizer"))
NAME = "deepspeed.initialize"


def supply_groups(wrapped, instance, args, kwargs):
    bound = inspect.signature(wrapped).bind_partial(*args, **kwargs)
    model = bound.arguments.get("model")
    if model is None or record_of(model, required=False) is None:
        return wrapped(*args, **kwargs)
    config = bound.arguments.get("config")
    if config is None:
        config = bound.arguments.get("config_params")
    with handover.handing_over(model, GROUPS.innermost(), config, optimizer=bound.arguments.get("optimizer")) as layout:
        result = wrapped(*args, **kwargs)
    handover.after(result[0])
    logger.info(f"ep_ds_shim: handed the EP model to deepspeed.initialize with DeepSpeed's expert groups ({layout})")
    return result
