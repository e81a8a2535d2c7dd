"""The DeepSpeed side: make an EP model something ZeRO-3 can train correctly, and catch it when it cannot.

ZeRO-3 assumes every rank of its data-parallel group holds a replica: `deepspeed.initialize` broadcasts
rank 0's parameters and averages gradients over that group. For an EP model loaded on the world group that
silently replaces every rank's experts with rank 0's (DESIGN §4). What this module does:

- `adopt_ep_model` (run by the loading shim at the end of an EP load under ZeRO-3): checks the load, turns
  DTensor parameters into plain local Parameters (DeepSpeed cannot swap or broadcast DTensors; the EP forward
  hooks work the same on local tensors), marks expert weights ``model_parallel`` so DeepSpeed's gradient norm
  counts each shard once, fingerprints the experts and arms a one-shot guard on the first forward.
- `initialize`: `deepspeed.initialize` with the DP x EP groups, then the integrity check.
- `verify_expert_integrity` / `check_deepspeed_groups`: the guard, callable by users.

Drop-in safety: the upstream recipe (`deepspeed.initialize` without ``mpu``) is *refused*, not repaired. The
shim does not patch DeepSpeed globally (leaving the block restores everything), so it cannot hand DeepSpeed the
groups behind the user's back; instead the guard raises on every rank at the first forward, before any
backward or optimizer step, and says what to pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import experts as _experts
from ._releases import refuse_training_if_defective, training_defect
from .errors import DeepSpeedGroupsError, EpShimError, ExpertIntegrityError

INFO_ATTR = "_ep_ds_shim"


@dataclass
class EPModelInfo:
    """What the shim recorded about an EP model when it was loaded (stored on the model)."""

    ep_size: int
    ep_ranks: tuple[int, ...]  # global ranks of this rank's EP group (they hold *different* experts)
    fingerprints: dict[str, _experts.Fingerprint]
    verified_under_deepspeed: bool = False
    guard_handle: object = field(default=None, repr=False)


def info_of(model) -> EPModelInfo:
    model = getattr(model, "module", model)  # a DeepSpeedEngine wraps the model as .module
    info = model.__dict__.get(INFO_ATTR)
    if info is None:
        raise EpShimError(
            f"{type(model).__name__} was not loaded with expert parallelism inside ep_zero3_compat() while "
            "ZeRO-3 was signalled, so the shim recorded nothing to check."
        )
    return info


def _ep_ranks(model, expert_params) -> tuple[int, ...]:
    """Global ranks of this rank's EP group, read from where this release keeps the EP mesh."""
    for param in expert_params.values():
        mesh = getattr(param, "device_mesh", None)
        if mesh is not None:
            return tuple(int(rank) for rank in mesh.mesh.flatten().tolist())
    manager = getattr(model, "_mesh_manager", None)
    if manager is not None:
        return tuple(int(rank) for rank in manager.get_mesh("ep").mesh.flatten().tolist())
    mesh = getattr(model, "_device_mesh", None)
    if mesh is not None:
        if mesh.ndim > 1 and "tp" in (mesh.mesh_dim_names or ()):
            mesh = mesh["tp"]
        return tuple(int(rank) for rank in mesh.mesh.flatten().tolist())
    raise EpShimError(f"{type(model).__name__}: cannot find the expert-parallel mesh after the EP load")


def _localise_dtensors(model) -> dict:
    """Replace DTensor parameters by plain Parameters holding this rank's local data.

    Expert shards (`Shard(0)` on the EP mesh) and replicated dense weights become local tensors; a dense weight
    that is *sharded* is tensor parallelism, which ZeRO-3 cannot partition correctly, so it is refused.
    Returns the modules whose expert weights were sharded DTensors, with their mesh.
    """
    from torch.distributed.tensor import DTensor, Replicate

    converted = {}
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if not isinstance(param, DTensor):
                continue
            full_name = f"{module_name}.{name}" if module_name else name
            if not _experts.is_expert_parameter_name(full_name) and not all(
                isinstance(p, Replicate) for p in param.placements
            ):
                raise EpShimError(
                    f"{full_name} is tensor-parallel sharded ({param.placements}); ep-ds-shim composes ZeRO-3 "
                    "with expert parallelism only, dense layers must stay whole. Load with "
                    "ep_ds_shim.ep_from_pretrained_kwargs(...), which maps the TP plan to 'replicate'."
                )
            if not all(isinstance(p, Replicate) for p in param.placements):
                converted[module] = param.device_mesh
            local = torch.nn.Parameter(param.to_local().detach(), requires_grad=param.requires_grad)
            local.__dict__.update({k: v for k, v in param.__dict__.items() if k.startswith("_is_hf")})
            module._parameters[name] = local
    return converted


def _reduce_expert_outputs(converted: dict) -> None:
    """On releases whose EP hook all-reduces the experts' output only while their weights are DTensors, attach
    that reduction to each converted experts module, using the release's own autograd function."""
    try:
        from transformers.distributed.tensor_parallel import _AllReduceForward as reduce
    except ImportError as error:
        raise EpShimError(
            "this release's EP hook needs DTensor expert weights to all-reduce expert outputs, and its "
            f"_AllReduceForward could not be found ({error}); the shim cannot make the experts DeepSpeed-ready. "
            "Report it with `python -m ep_ds_shim doctor`."
        ) from error
    for module, mesh in converted.items():
        group = mesh.get_group()

        def all_reduce_output(module, args, output, group=group):
            return reduce.apply(output, group)

        module.register_forward_hook(all_reduce_output)


def adopt_ep_model(model, ep_size: int, family) -> None:
    """Called at the end of an EP load under ZeRO-3 (inside the block)."""
    from ._load import check_loaded_model

    check_loaded_model(model, ep_size)
    expert_params = _experts.expert_parameters(model)
    ep_ranks = _ep_ranks(model, expert_params)
    converted = _localise_dtensors(model)
    if converted and family.expert_output_reduce_needs_dtensors:
        _reduce_expert_outputs(converted)
    expert_params = _experts.expert_parameters(model)
    for param in expert_params.values():
        # DeepSpeed's marker for "differs across the model-parallel group": its gradient norm then sums this
        # weight over the EP group while counting dense weights once.
        param.model_parallel = True
    info = EPModelInfo(ep_size, ep_ranks, _experts.fingerprints(expert_params))
    model.__dict__[INFO_ATTR] = info
    import transformers

    reason = training_defect(transformers.__version__)
    if reason is not None:
        from ._load import logger

        logger().warning(f"ep_ds_shim: loaded for inference only. {reason}; DeepSpeed training will be refused.")
    info.guard_handle = model.register_forward_pre_hook(_first_forward_guard, with_kwargs=True)


def _under_zero3(model) -> bool:
    # ZeRO-3 converts every parameter of the module it wraps, so the first one tells; this runs on every forward
    # until DeepSpeed has wrapped the model (pure inference: always), so it must not walk all parameters.
    first = next(model.parameters(), None)
    return first is not None and hasattr(first, "ds_id")


def _first_forward_guard(model, args, kwargs):
    """One-shot: the first forward after DeepSpeed wrapped the model checks groups and expert integrity."""
    if not _under_zero3(model):
        return None
    refuse_training_if_defective()
    info = info_of(model)
    check_deepspeed_groups(model)
    if not info.verified_under_deepspeed:
        verify_expert_integrity(model)
    info.guard_handle.remove()
    return None


_WHAT_TO_PASS = (
    "Pass the DP x EP groups: `layout = ep_ds_shim.DPxEPLayout(ep_size)` on every rank before loading, then "
    "`deepspeed.initialize(..., mpu=layout.mpu())`, or call `ep_ds_shim.initialize(model=..., layout=layout, ...)`."
)


def check_deepspeed_groups(model) -> None:
    """Raise if ZeRO-3 would treat ranks holding different experts as replicas. Local, no collective."""
    model = getattr(model, "module", model)
    info = info_of(model)
    rank = dist.get_rank()
    peers = set(info.ep_ranks) - {rank}
    for name, param in _experts.expert_parameters(model).items():
        group = getattr(param, "ds_process_group", None)
        if group is None:
            continue
        members = set(dist.get_process_group_ranks(group))
        mixed = sorted(members & peers)
        if mixed:
            raise DeepSpeedGroupsError(
                f"deepspeed.initialize partitions {name} over ranks {sorted(members)}, which include {mixed}: "
                f"ranks of this rank's expert-parallel group {list(info.ep_ranks)} that hold *different* experts. "
                "ZeRO-3 has already overwritten them with one rank's experts and would average unrelated "
                f"gradients. {_WHAT_TO_PASS}"
            )
    from deepspeed.utils import groups

    mpu = getattr(groups, "mpu", None)
    if mpu is not None and info.ep_size > 1:
        mp_ranks = sorted(dist.get_process_group_ranks(mpu.get_model_parallel_group()))
        if mp_ranks != sorted(info.ep_ranks):
            raise DeepSpeedGroupsError(
                f"DeepSpeed's model-parallel group is {mp_ranks}, but this rank's expert-parallel group is "
                f"{list(info.ep_ranks)}: the gradient norm (gradient clipping is on by default) would differ "
                f"between EP ranks and dense weights would drift apart. {_WHAT_TO_PASS}"
            )


def verify_expert_integrity(model) -> None:
    """Check, on every rank at once, that each rank's expert shards still equal what it loaded.

    A collective: call it on every rank (right after `deepspeed.initialize`, before training changes the
    weights). Raises `ExpertIntegrityError` on all ranks if any rank's experts changed.
    """
    model = getattr(model, "module", model)
    info = info_of(model)
    expert_params = _experts.expert_parameters(model)
    gather = contextlib.nullcontext()
    if _under_zero3(model):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(expert_params.values()), modifier_rank=None)
    with gather:
        current = _experts.fingerprints(expert_params)
    changed = [name for name, before in info.fingerprints.items() if not before.matches(current.get(name))]
    verdict = torch.tensor([0 if changed else 1], dtype=torch.int32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
    if changed or int(verdict) == 0:
        here = f"on this rank: {changed[:4]}{' ...' if len(changed) > 4 else ''}" if changed else "on another rank"
        raise ExpertIntegrityError(
            f"expert weights no longer equal what each rank loaded ({here}). Something (typically ZeRO-3's "
            f"broadcast over the wrong data-parallel group) overwrote an EP shard. {_WHAT_TO_PASS}"
        )
    info.verified_under_deepspeed = _under_zero3(model)


def initialize(*, model, layout, config, optimizer=None, allow_unverified: bool = False, **kwargs):
    """`deepspeed.initialize` for an EP model with the DP x EP groups, followed by the integrity check.

    Returns what `deepspeed.initialize` returns. Any keyword it accepts passes through, except ``mpu``.
    """
    import deepspeed

    check_before_training(allow_unverified=allow_unverified)
    if "mpu" in kwargs:
        raise TypeError("ep_ds_shim.initialize supplies mpu from the layout; do not pass it")
    info_of(model)  # refuse a model the shim did not load
    result = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=layout.mpu(), **kwargs)
    check_engine(result[0])
    return result


def check_before_training(*, allow_unverified: bool = False) -> None:
    """Before DeepSpeed takes an EP model: a verified DeepSpeed, and a transformers whose EP trains correctly."""
    import deepspeed

    from ._releases import check_deepspeed

    check_deepspeed(getattr(deepspeed, "__version__", None), allow_unverified=allow_unverified)
    refuse_training_if_defective()


def check_engine(engine) -> None:
    """Right after `deepspeed.initialize`: the groups are the DP x EP ones and every expert shard is intact."""
    check_deepspeed_groups(engine)
    verify_expert_integrity(engine)
