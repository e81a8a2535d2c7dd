"""Before DeepSpeed takes an EP model: every rank holds the same kind of model, split the same way, builds the same
layout, and each rank's EP group is the layout's (the exchange and the error are `ep_ds_shim.rank_agreement`)."""

from __future__ import annotations

from .. import experts
from ..errors import RankDisagreementError
from ..rank_agreement import agree, versions
from .record import record_of, unwrap


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
        "versions": versions(),
    }
    summaries = agree("before_deepspeed", summary, "the DeepSpeed hand-over (ep_ds_shim.initialize / "
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
