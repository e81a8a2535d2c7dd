"""The legacy EP spelling on releases where it silently turns EP off (not a ZeRO-3 gate).

Upstream: from 5.19, `DistributedConfig(enable_expert_parallel=True)` without `ep_size` resolves to
`ep_size=tp_size`, i.e. 1 unless `tp_size` is also given (5.23 also says so in a FutureWarning, on rank 0
only). The load then runs without EP and, under ZeRO-3, through `zero.Init`: every rank trains every expert,
with no error.
What the shim does: inside a block, `DistributedConfig.__post_init__` is observed (the release's own code runs
unchanged) and a config whose flag asked for EP but resolved to `ep_size == 1` is marked. `from_pretrained`
then refuses it with `EPRequestError` when ZeRO-3 is signalled (it would otherwise train the wrong model
layout), and warns when it is not (the load stays exactly what transformers does). Configs built *before*
the block is entered cannot be observed.
"""

from __future__ import annotations

import wrapt

from .._state import block_active
from .._targets import Target

TARGET = Target("transformers.distributed.configuration_utils:DistributedConfig", "__post_init__", "function",
                params=("self",))
MARK = "_ep_ds_shim_legacy_flag_without_ep"


def _observe(wrapped, instance, args, kwargs):
    asked_for_ep = bool(getattr(instance, "enable_expert_parallel", False)) and getattr(instance, "ep_size", 0) is None
    result = wrapped(*args, **kwargs)
    if asked_for_ep and getattr(instance, "ep_size", None) == 1:
        instance.__dict__[MARK] = True
    return result


def wrap_post_init(original):
    return wrapt.FunctionWrapper(original, _observe, enabled=block_active)


def legacy_flag_without_ep(distributed_config) -> bool:
    return bool(getattr(distributed_config, "__dict__", {}).get(MARK))


def message(kind: str) -> str:
    return (
        f"DistributedConfig(enable_expert_parallel=True) without ep_size/tp_size {kind} on this transformers "
        "release: it resolves to ep_size=1, so no expert parallelism. Ask for EP of size N with "
        "ep_ds_shim.ep_from_pretrained_kwargs(path, ep_size=N) (or DistributedConfig(ep_size=N, tp_size=N, ...))."
    )
