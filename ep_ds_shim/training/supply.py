"""The `deepspeed.initialize` wrapper behind `supply_deepspeed_groups`.

`accelerate`'s `Accelerator.prepare` and the transformers `Trainer` (through accelerate) call
`deepspeed.initialize` themselves and have no way to pass an ``mpu``. Inside the block, a call whose model is an
EP model the shim loaded, and that brings no ``mpu`` of its own, gets ``mpu=layout.mpu()``; a
``train_batch_size`` the launcher computed over all ranks is restated over data-parallel replicas (EP ranks
share one batch); the hand-over checks run before and after (`handover.py`). Other calls pass through untouched.
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
    if model is None or bound.arguments.get("mpu") is not None or record_of(model, required=False) is None:
        return wrapped(*args, **kwargs)
    arguments = dict(bound.arguments)
    config_key = "config" if arguments.get("config") is not None else "config_params"
    layout = handover.before(model, GROUPS.innermost(), arguments.get(config_key), optimizer=arguments.get("optimizer"))
    arguments["mpu"] = layout.mpu()
    if arguments.get(config_key) is not None:
        arguments[config_key] = handover.restate_batch_size(arguments[config_key], layout)
    result = wrapped(**arguments)
    handover.after(result[0])
    logger.info(f"ep_ds_shim: supplied the DP x EP groups to deepspeed.initialize ({layout})")
    return result
