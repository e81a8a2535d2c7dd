"""Catching DeepSpeed set-ups that would train an EP model silently wrong, before they change anything.

- `check_deepspeed_groups`: ZeRO-3 partitions a parameter over a group that mixes ranks holding different experts,
  or DeepSpeed's model-parallel group is not the EP group (local check, no collective).
- `verify_expert_integrity`: every rank's expert shards still equal what it loaded (a cross-rank check): catches
  DeepSpeed's initial broadcast from rank 0 over the wrong data-parallel group, at any ZeRO stage.
- the first-forward guard (armed by `adoption.make_deepspeed_ready`): runs both before the first forward of a
  model DeepSpeed may have taken without the library (e.g. `deepspeed.initialize` without `mpu`), so the
  upstream recipe is refused on every rank before any backward or optimizer step; and refuses training forwards
  on releases whose EP backward is wrong upstream.
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.distributed as dist

from .. import experts
from ..distributed import exchange, initialised
from ..errors import DeepSpeedGroupsError, ExpertIntegrityError
from ..releases.support import refuse_training_if_defective, transformers_version
from .record import EPModelRecord, record_of, unwrap

WHAT_TO_PASS = (
    "Pass the DP x EP groups: `layout = ep_ds_shim.DPxEPLayout(ep_size)` on every rank before loading, then "
    "`ep_ds_shim.initialize(model=..., layout=layout, ...)` (or `deepspeed.initialize(..., mpu=layout.mpu())`), or "
    "wrap the launcher's call in `ep_ds_shim.supply_deepspeed_groups(layout)`."
)


def arm(model, record: EPModelRecord) -> None:
    if record.guard_handle is None:
        record.guard_handle = model.register_forward_pre_hook(_guard, with_kwargs=True)


def _guard(model, args, kwargs):
    """Before a forward: on the first one, and again on the first training one (DeepSpeed may have taken the model
    in between, e.g. after a sanity-check forward), unless the library handed it to DeepSpeed and checked it then.
    Afterwards it costs two attribute reads per forward."""
    record = record_of(model)
    training = model.training and torch.is_grad_enabled()
    if training:
        # transformers' own EP backward is wrong on some releases: refuse training there, keep inference
        refuse_training_if_defective(transformers_version())
    due = "forward" not in record.checked or (training and "training forward" not in record.checked)
    if due and "deepspeed hand-over" not in record.checked:
        check_deepspeed_groups(model)
        # The ranks of an EP group run every forward together (their expert outputs are all-reduced), so they can
        # check together without waiting for other data-parallel replicas.
        verify_expert_integrity(model, ranks=record.ep_ranks)
        record.checked.update(("forward", "training forward") if training else ("forward",))
    return None


def under_zero3(model) -> bool:
    # ZeRO-3 converts every parameter of the module it wraps, so the first one tells.
    first = next(model.parameters(), None)
    return first is not None and hasattr(first, "ds_id")


def check_deepspeed_groups(model_or_engine) -> None:
    """Raise if DeepSpeed would treat ranks holding different experts as replicas. Local, no collective."""
    model = unwrap(model_or_engine)
    record = record_of(model)
    if not initialised():
        return
    rank = dist.get_rank()
    peers = set(record.ep_ranks) - {rank}
    for name, param in experts.expert_parameters(model).items():
        group = getattr(param, "ds_process_group", None)
        if group is None:
            continue
        members = set(dist.get_process_group_ranks(group))
        mixed = sorted(members & peers)
        if mixed:
            raise DeepSpeedGroupsError(
                f"deepspeed.initialize partitions {name} over ranks {sorted(members)}, which include {mixed}: "
                f"ranks of this rank's expert-parallel group {list(record.ep_ranks)} that hold *different* experts. "
                "ZeRO-3 has already overwritten them with one rank's experts and would average unrelated "
                f"gradients. {WHAT_TO_PASS}"
            )
    groups = _deepspeed_groups()
    mpu = getattr(groups, "mpu", None) if groups is not None else None
    if mpu is not None and record.ep_size > 1:
        mp_ranks = sorted(dist.get_process_group_ranks(mpu.get_model_parallel_group()))
        if mp_ranks != sorted(record.ep_ranks):
            raise DeepSpeedGroupsError(
                f"DeepSpeed's model-parallel group is {mp_ranks}, but this rank's expert-parallel group is "
                f"{list(record.ep_ranks)}: the gradient norm (gradient clipping is on by default) would differ "
                f"between EP ranks and dense weights would drift apart. {WHAT_TO_PASS}"
            )


def _deepspeed_groups():
    """DeepSpeed's group registry, if DeepSpeed has been imported (the guard never imports it itself: a model that
    DeepSpeed has not seen does not need it)."""
    return sys.modules.get("deepspeed.utils.groups")


def verify_expert_integrity(model_or_engine, *, ranks: tuple[int, ...] | None = None) -> None:
    """Check, on every rank at once, that each rank's expert shards still equal what it loaded.

    A cross-rank check: call it on every rank (right after `deepspeed.initialize`, before training changes the
    weights). Raises `ExpertIntegrityError` on all ranks if any rank's experts changed.
    """
    model = unwrap(model_or_engine)
    record = record_of(model)
    expert_params = experts.expert_parameters(model)
    gather = contextlib.nullcontext()
    if under_zero3(model):
        import deepspeed  # only reached once DeepSpeed has converted the model, so it is imported already

        gather = deepspeed.zero.GatheredParameters(list(expert_params.values()), modifier_rank=None)
    with gather:
        current = experts.fingerprints(expert_params)
    changed = [name for name, before in record.fingerprints.items() if not before.matches(current.get(name))]
    verdicts = {0: {"changed": changed}}
    if initialised():
        verdicts = exchange("expert_integrity", {"changed": changed}, ranks=ranks, what="the expert integrity check")
    bad = {rank: verdict["changed"] for rank, verdict in verdicts.items() if verdict["changed"]}
    if bad:
        here = f"on this rank: {changed[:4]}{' ...' if len(changed) > 4 else ''}" if changed else "on other ranks"
        raise ExpertIntegrityError(
            f"expert weights no longer equal what each rank loaded ({here}; ranks affected: {sorted(bad)}). Something "
            "(typically DeepSpeed's initial broadcast over the wrong data-parallel group) overwrote an EP shard. "
            f"{WHAT_TO_PASS}"
        )
