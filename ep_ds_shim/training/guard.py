"""Catching DeepSpeed set-ups that would train an EP model silently wrong, before they change anything.

Every EP model loaded inside the block carries two instance-level guards (set in its own ``__dict__``; no class
is patched, and without DeepSpeed they change nothing):

- `set_deepspeed_parallelism`: DeepSpeed's own per-module hook, which `deepspeed.initialize` calls on every module
  that has it, at every ZeRO stage, after it has chosen its groups and before it broadcasts or partitions anything
  (docs/design.md, "What DeepSpeed does to the model"). DeepSpeed's MoE layers build their expert groups there;
  so does this one (`expert_groups.create_groups`), for a model the library is handing over. It refuses, on every
  rank, a model DeepSpeed takes any other way (the upstream recipe: DeepSpeed would broadcast rank 0's experts over
  every rank and average unrelated gradients) and a data-parallel group that is not every rank (an `mpu`).
- `to`: only while the expert weights are still DTensors (the model as transformers returned it), DeepSpeed's
  `module.to(device)` fails with an opaque "Couldn't swap" error; the guard re-raises it as a clear one.

Then, as a second line:

- `check_deepspeed_groups`: ZeRO-3 partitions an expert shard over a group that is not its expert-data-parallel
  group, or a dense weight over a group that is not every rank (local check, no collective).
- `verify_expert_integrity`: every rank's expert shards still equal what it loaded (a cross-rank check).
- the first-forward guard (armed by `deepspeed_ready.make_deepspeed_ready`): runs both before the first forward, and the
  first training forward, of a model the library did not hand to DeepSpeed itself; and refuses training forwards
  on releases where EP training is refused.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .. import experts
from ..distributed import arrive, exchange, initialised
from ..errors import DeepSpeedGroupsError, EpShimError, ExpertIntegrityError
from ..releases.lines import refuse_training_if_unsupported
from ..releases.support import transformers_version
from . import expert_groups
from .record import EPModelRecord, record_of, unwrap

HANDOVER_HINT = (
    "Hand EP models to DeepSpeed through the library: `ep_ds_shim.initialize(model=..., layout=layout, ...)` "
    "instead of `deepspeed.initialize`, `with ep_ds_shim.supply_deepspeed_groups(layout): accelerator.prepare(...)` "
    "for launchers that call it themselves, or `ep_ds_shim.EPTrainer`; it makes the model DeepSpeed-ready and puts "
    "its experts in DeepSpeed's expert groups."
)


class DeepSpeedGroupsCheck:
    """DeepSpeed's `set_deepspeed_parallelism` hook on an EP model: builds DeepSpeed's expert groups for a model the
    library hands over, and refuses every other way in before DeepSpeed changes anything."""

    def __init__(self, model, record: EPModelRecord):
        self.model = weakref.ref(model)
        self.record = record

    def __call__(self, use_data_before_expert_parallel_: bool = False, *args, **kwargs) -> None:
        if not self.record.deepspeed_ready:
            raise DeepSpeedGroupsError(
                "deepspeed.initialize was given an EP model as transformers returned it (nothing has been changed "
                f"yet). {HANDOVER_HINT}"
            )
        if not self.record.handing_over:
            raise DeepSpeedGroupsError(
                "deepspeed.initialize was called on an EP model outside the library's hand-over, so nothing would "
                "put its experts in DeepSpeed's expert groups: DeepSpeed would broadcast one rank's experts over the "
                f"others and average unrelated gradients (nothing has been changed yet). {HANDOVER_HINT}"
            )
        expert_groups.create_groups(self.model(), self.record,
                                    use_data_before_expert_parallel=bool(use_data_before_expert_parallel_))


class ClearSwapError:
    """`model.to` while the expert weights are DTensors: the model's own `to`, with DeepSpeed's opaque failure on
    DTensors ("Couldn't swap ...: Cannot swap t1 because it has weakref") re-raised as a clear error."""

    def __init__(self, model):
        self.model = weakref.ref(model)

    def __call__(self, *args, **kwargs):
        model = self.model()
        try:
            return type(model).to(model, *args, **kwargs)
        except RuntimeError as error:
            if "Couldn't swap" not in str(error):
                raise
            raise EpShimError(
                f"{type(model).__name__}.to() failed on its DTensor expert weights ({error}). That is what "
                "deepspeed.initialize does with an EP model as transformers returned it; DeepSpeed cannot take DTensor "
                f"weights and needs the DP x EP groups. {HANDOVER_HINT}"
            ) from error


def attach_instance_guards(model, record: EPModelRecord) -> None:
    """At the end of an EP load inside the block (see the module docstring)."""
    model.__dict__["set_deepspeed_parallelism"] = DeepSpeedGroupsCheck(model, record)
    if any(isinstance(param, DTensor) for param in model.parameters()):
        model.__dict__["to"] = ClearSwapError(model)


def drop_swap_guard(model) -> None:
    """Once the weights are local tensors, `to` is the model's own again."""
    if isinstance(model.__dict__.get("to"), ClearSwapError):
        del model.__dict__["to"]


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
        # EP training is refused on some releases (wrong upstream, or no token dispatcher): inference stays fine
        refuse_training_if_unsupported(transformers_version())
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
    """Raise if ZeRO-3 partitions an expert shard over anything but its expert-data-parallel group (ranks holding
    the same experts) or a dense weight over anything but every rank. Local, no collective."""
    model = unwrap(model_or_engine)
    record = record_of(model)
    if not initialised():
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    peers = set(record.ep_ranks) - {rank}
    same_experts = expert_groups.expert_data_parallel_ranks(record)
    expert_names = set(experts.expert_parameters(model))
    for name, param in model.named_parameters():
        group = getattr(param, "ds_process_group", None)
        if group is None:
            continue
        members = sorted(dist.get_process_group_ranks(group))
        if name in expert_names and members != same_experts:
            mixed = sorted(set(members) & peers)
            raise DeepSpeedGroupsError(
                f"deepspeed.initialize partitions {name} over ranks {members}"
                + (f", which include {mixed}: ranks of this rank's expert-parallel group {list(record.ep_ranks)} "
                   "that hold *different* experts. ZeRO-3 has already overwritten them with one rank's experts and "
                   "would average unrelated gradients" if mixed else
                   f", not over the ranks holding the same experts {same_experts}")
                + f". {HANDOVER_HINT}"
            )
        if name not in expert_names and members != list(range(world)):
            raise DeepSpeedGroupsError(
                f"deepspeed.initialize partitions the dense weight {name} over ranks {members}, not over every rank "
                f"(it was given an `mpu`): each rank would hold more of the dense state than it needs. {HANDOVER_HINT}"
            )


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

        # gathering the shards is a collective: a call made on some ranks only must be named, not hang
        arrive("expert_integrity", what="the expert integrity check (verify_expert_integrity)")
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
            f"{HANDOVER_HINT}"
        )
