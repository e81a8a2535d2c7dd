"""The legacy EP spelling on releases where it silently turns EP off.

Upstream: from 5.20, `DistributedConfig(enable_expert_parallel=True)` without `ep_size` resolves to
`ep_size=tp_size`, i.e. 1 unless `tp_size` is also given (5.23 also says so in a FutureWarning, on rank 0
only). The load then runs without EP and, under ZeRO-3, through `zero.Init`: every rank trains every expert,
with no error.

What the shim does: `DistributedConfig._resolve_parallelism` leaves a recognisable trace of that case: it sets
``tp_plan = {}`` (a default config keeps ``None``) together with ``ep_size == tp_size == 1``. So a config is
recognised wherever it was built, before the block or inside it, without patching anything. `from_pretrained`
then refuses it with `EPRequestError` when ZeRO-3 is signalled (it would otherwise train the wrong model layout),
translates it when the block asks for that (`python -m ep_ds_shim.run`), and otherwise warns: the load stays
exactly what transformers does.
"""

from __future__ import annotations


def legacy_flag_without_ep(distributed_config) -> bool:
    """`distributed_config` is what `DistributedConfig(enable_expert_parallel=True)` resolves to on 5.20+."""
    return (
        distributed_config is not None
        and getattr(distributed_config, "tp_plan", None) == {}
        and getattr(distributed_config, "ep_size", None) == 1
        and getattr(distributed_config, "tp_size", None) == 1
    )


def message(kind: str) -> str:
    return (
        f"DistributedConfig(enable_expert_parallel=True) without ep_size/tp_size {kind} on this transformers "
        "release: it resolves to ep_size=1 (tp_plan={}), so no expert parallelism. Ask for EP of size N with "
        "ep_ds_shim.ep_from_pretrained_kwargs(path, ep_size=N) (or DistributedConfig(ep_size=N, tp_size=N, ...))."
    )
