"""`supply_deepspeed_groups()`: hand `deepspeed.initialize` the DP x EP groups when a launcher calls it.

`accelerate`'s `Accelerator.prepare` and the transformers `Trainer` (through accelerate) call
`deepspeed.initialize` themselves and have no way to pass an ``mpu``. Inside this block, a call to
`deepspeed.initialize` whose model is an EP model the shim loaded, and that brings no ``mpu`` of its own, gets
``mpu=layout.mpu()``; a ``train_batch_size`` the launcher computed over all ranks is restated over
data-parallel replicas (EP ranks share one batch); the integrity check runs right after. Other calls pass
through untouched. Like `ep_zero3_compat`, the wrapper is installed while a block is open, acts only in the
thread/task that opened it, and leaving restores `deepspeed.initialize` to the identical object.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

import wrapt

from ._install import _Installation
from ._targets import Target, check_shape
from .errors import TargetDriftError

TARGET = Target("deepspeed", "initialize", "function", leading_params=("args", "model", "optimizer"))

# The layouts of the enclosing blocks, innermost last (a tuple, so each thread/task has its own stack; a block
# without an explicit layout contributes None).
_layouts: ContextVar[tuple] = ContextVar("ep_ds_shim_groups_layouts", default=())
_auto_layouts: dict[int, object] = {}


def _active() -> bool:
    return bool(_layouts.get())


def _layout_for(info):
    """The explicit layout of the block, or one built (once per EP size) to match the loaded model."""
    from .layout import DPxEPLayout

    layout = _layouts.get()[-1] if _layouts.get() else None
    if layout is None:
        layout = _auto_layouts.get(info.ep_size)
        if layout is None:
            layout = _auto_layouts[info.ep_size] = DPxEPLayout(info.ep_size)
    if tuple(layout.ep_ranks) != tuple(info.ep_ranks):
        from .errors import DeepSpeedGroupsError

        raise DeepSpeedGroupsError(
            f"the model was loaded with expert-parallel group {list(info.ep_ranks)}, but the layout's EP group for "
            f"this rank is {list(layout.ep_ranks)}; load with layout.from_pretrained_kwargs(...) of the same layout."
        )
    return layout


def _restate_batch_size(config, layout):
    """Launchers compute train_batch_size = micro x accumulation x *ranks*; DeepSpeed, given the mpu, checks it
    against data-parallel replicas. Restate it (only when it is exactly the all-ranks product)."""
    if not isinstance(config, dict) or "train_batch_size" not in config:
        return config
    micro = config.get("train_micro_batch_size_per_gpu")
    accumulation = config.get("gradient_accumulation_steps", 1)
    if not isinstance(micro, int) or not isinstance(accumulation, int):
        return config
    if config["train_batch_size"] == micro * accumulation * layout.world_size:
        config = dict(config, train_batch_size=micro * accumulation * layout.dp_size)
    return config


def _supply(wrapped, instance, args, kwargs):
    from .zero3 import INFO_ATTR, check_before_training, check_engine

    model = kwargs.get("model", args[1] if len(args) > 1 else None)
    info = getattr(model, "__dict__", {}).get(INFO_ATTR) if model is not None else None
    if info is None or kwargs.get("mpu") is not None or len(args) > 7:
        return wrapped(*args, **kwargs)
    check_before_training()
    layout = _layout_for(info)
    kwargs = dict(kwargs, mpu=layout.mpu())
    for key in ("config", "config_params"):
        if key in kwargs:
            kwargs[key] = _restate_batch_size(kwargs[key], layout)
    result = wrapped(*args, **kwargs)
    check_engine(result[0])
    from ._load import logger

    logger().info(f"ep_ds_shim: supplied the DP x EP groups to deepspeed.initialize ({layout})")
    return result


def _install_groups() -> list:
    report = check_shape(TARGET, is_gate=False)
    if not report.ok:
        raise TargetDriftError(f"cannot supply DeepSpeed groups: {report.problem}; nothing was patched.")
    return [TARGET.install(lambda original: wrapt.FunctionWrapper(original, _supply, enabled=_active))]


INSTALLATION = _Installation(_install_groups)


class supply_deepspeed_groups(contextlib.ContextDecorator):  # noqa: N801
    """While open, `deepspeed.initialize` calls on EP models the shim loaded get the DP x EP groups.

    Args:
        layout: the `DPxEPLayout` the model was loaded with; default: one built for the model's EP size
            (world = dp x ep, EP groups of consecutive ranks).
    """

    def __init__(self, layout=None):
        from .layout import DPxEPLayout

        if layout is not None and not isinstance(layout, DPxEPLayout):
            raise TypeError(f"layout must be a DPxEPLayout or None, got {type(layout).__name__}")
        self.layout = layout

    def __enter__(self):
        INSTALLATION.acquire()
        _layouts.set((*_layouts.get(), self.layout))
        return self

    def __exit__(self, *exc):
        _layouts.set(_layouts.get()[:-1])
        INSTALLATION.release()
        return False
