"""Upstream's own EP spellings inside the block under ZeRO-3: translated to the library's EP request, or refused
before any weight is read with the one-line fix.

Two spellings reach the block from upstream's documentation, recipes and tests:

- the canonical one, ``DistributedConfig(tp_size=N, ep_size=N)`` (transformers' EP tests use it): it also switches
  on the model's default *tensor*-parallel plan, so the dense layers are split over the EP ranks, which ZeRO-3 cannot
  own (the hand-over refused it after the whole load). Translated: EP of size N with every TP rule "replicate", the
  library's request (`ep_from_pretrained_kwargs`), dense layers whole, with a log line saying so;
- the legacy one, below.

The legacy EP spelling on releases where it silently turns EP off:

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

from .. import experts
from ..distributed import world_size
from ..releases.ep_request import ep_from_pretrained_kwargs
from .request import DENSE_SPLITTING_STYLES, model_source

SWITCH = "ep_zero3_compat(translate_upstream_spelling=False)"


def legacy_flag_without_ep(distributed_config) -> bool:
    """`distributed_config` is what `DistributedConfig(enable_expert_parallel=True)` resolves to on 5.20+."""
    return (
        distributed_config is not None
        and getattr(distributed_config, "tp_plan", None) == {}
        and getattr(distributed_config, "ep_size", None) == 1
        and getattr(distributed_config, "tp_size", None) == 1
    )


def dense_tp_request(distributed_config) -> bool:
    """An EP request (ep_size >= 2) that also asks for tensor parallelism of the dense layers: tp_size >= 2 with the
    model's default TP plan (no plan given) or a plan that splits weights outside the experts."""
    if distributed_config is None or (getattr(distributed_config, "ep_size", None) or 1) < 2:
        return False
    if (getattr(distributed_config, "tp_size", None) or 1) < 2:
        return False
    plan = getattr(distributed_config, "tp_plan", None)
    if not plan:
        return True
    return any(style in DENSE_SPLITTING_STYLES and experts.EXPERT_MODULE_NAME not in key.split(".")
               for key, style in plan.items())


def translated(cls, args, kwargs: dict, ep_size: int) -> dict:
    """The call's keyword arguments with its EP request replaced by this release's EP spelling of size `ep_size`
    (dense layers whole); everything else unchanged."""
    kept = {k: v for k, v in kwargs.items() if k not in ("distributed_config", "device_mesh", "tp_size", "tp_plan")}
    return {**kept, **ep_from_pretrained_kwargs(model_source(args, kwargs), ep_size, model_class=cls)}


def legacy_ep_size(kwargs: dict) -> int:
    """The EP size the legacy spelling meant: its device mesh's size, else the world."""
    mesh = kwargs.get("device_mesh")
    return mesh.size() if mesh is not None else (world_size() or 1)


def dense_tp_message(cls_name: str, ep_size: int, tp_size: int, *, translated_: bool) -> str:
    asked = f"DistributedConfig(tp_size={tp_size}, ep_size={ep_size})"
    if translated_:
        return (f"ep_ds_shim: {asked} also asks transformers to split the dense layers of {cls_name} over the EP "
                f"ranks (tensor parallelism), which ZeRO-3 cannot own; loading it as expert parallelism only "
                f"(ep_size={ep_size}): dense layers whole, ZeRO-3 partitions them. {SWITCH} refuses instead.")
    return (f"{cls_name}: {asked} also splits the dense layers over the EP ranks (tensor parallelism), which ZeRO-3 "
            f"cannot own; nothing was loaded. Ask for expert parallelism alone: "
            f"from_pretrained(path, **ep_ds_shim.ep_from_pretrained_kwargs(path, ep_size={ep_size})).")


def message(kind: str) -> str:
    return (
        f"DistributedConfig(enable_expert_parallel=True) without ep_size/tp_size {kind} on this transformers "
        "release: it resolves to ep_size=1 (tp_plan={}), so no expert parallelism. Ask for EP of size N with "
        "ep_ds_shim.ep_from_pretrained_kwargs(path, ep_size=N) (or DistributedConfig(ep_size=N, tp_size=N, ...)); "
        f"inside the block under ZeRO-3 it is translated unless {SWITCH}."
    )
