"""Ranks that must agree, checked before they act on it: one clear error on every rank instead of a gloo abort,
an NCCL hang or silently different models.

Two points: before an EP load starts (the request: model class, EP size, dtype, versions), and before DeepSpeed
takes the model (what each rank actually holds, and the layout DeepSpeed will be given). Both exchange a small
summary through the process group's store with a timeout (`ep_ds_shim.distributed.exchange`), so a rank that
never gets there is named instead of hanging the others.
"""

from __future__ import annotations

from importlib import metadata

import torch
import torch.distributed as dist

from .. import experts
from ..distributed import exchange
from ..errors import RankDisagreementError
from ..version import __version__
from .record import record_of, unwrap
from ..releases.support import transformers_version


def _versions() -> dict:
    try:
        deepspeed = metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        deepspeed = None
    return {"transformers": transformers_version(), "deepspeed": deepspeed, "ep-ds-shim": __version__,
            "torch": torch.__version__}


def check_load_request(model_class: str, ep_size: int, kwargs: dict) -> None:
    """Before the load's first collective: every rank asks for the same EP load."""
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype", "default"))
    summary = {"model class": model_class, "ep_size": ep_size, "dtype": str(dtype), "versions": _versions()}
    _agree("ep_load", summary, "the EP load (from_pretrained inside ep_zero3_compat)")


def check_before_deepspeed(model_or_engine, layout, zero_stage) -> None:
    """Before DeepSpeed sees the model: every rank holds the same kind of model, split the same way, and builds the
    same layout; each rank's EP group is the layout's."""
    model = unwrap(model_or_engine)
    record = record_of(model)
    summary = {
        "model type": getattr(model.config, "model_type", None),
        "model class": type(model).__name__,
        "parameter dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "ep_size": record.ep_size,
        "expert shard shapes": {n: list(experts.local_tensor(p).shape) for n, p in experts.expert_parameters(model).items()},
        "layout": None if layout is None else {"world": layout.world_size, "dp": layout.dp_size, "ep": layout.ep_size},
        "ZeRO stage": zero_stage,
        "versions": _versions(),
    }
    summaries = _agree("before_deepspeed", summary, "the DeepSpeed hand-over (ep_ds_shim.initialize / "
                       "supply_deepspeed_groups / EPTrainer)", extra={"ep group": list(record.ep_ranks)})
    groups = {rank: tuple(s["ep group"]) for rank, s in summaries.items()}
    wrong = {rank: list(group) for rank, group in groups.items()
             if rank not in group or any(groups.get(member) != group for member in group)}
    if layout is not None:
        wrong.update({rank: list(groups[rank]) for rank in groups
                      if groups[rank] != tuple(range(rank // layout.ep_size * layout.ep_size,
                                                     (rank // layout.ep_size + 1) * layout.ep_size))})
    if wrong:
        raise RankDisagreementError(
            f"the expert-parallel groups the ranks loaded with do not form one consistent DP x EP layout: {wrong} "
            f"(rank -> its EP group; the layout expects groups of {layout.ep_size if layout else '?'} consecutive "
            "ranks). Load every rank with the same layout's from_pretrained_kwargs(...)."
        )


def _agree(topic: str, summary: dict, what: str, *, extra: dict | None = None) -> dict[int, dict]:
    """Exchange `summary` (+ per-rank `extra`, not compared) among all ranks; raise the same error everywhere if
    any field differs."""
    summaries = exchange(topic, {**summary, **(extra or {})}, what=what)
    differences = []
    for key in summary:
        values: dict[str, list[int]] = {}
        for rank, other in sorted(summaries.items()):
            values.setdefault(repr(other.get(key)), []).append(rank)
        if len(values) > 1:
            differences.append(f"{key}: " + "; ".join(f"ranks {ranks} have {value}" for value, ranks in values.items()))
    if differences:
        raise RankDisagreementError(
            f"rank {dist.get_rank()}: the ranks disagree before {what}:\n  - " + "\n  - ".join(differences)
            + "\nEvery rank must run the same load and training set-up (same dtype, EP size, model, layout and "
            "library versions); nothing was run with these differences."
        )
    return summaries
