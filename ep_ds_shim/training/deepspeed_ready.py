"""Recording an EP model at load, and making it something DeepSpeed can train correctly.

ZeRO assumes every rank of its data-parallel group holds a replica: `deepspeed.initialize` broadcasts rank 0's
parameters, partitions every parameter over that group and averages gradients there. An EP model's ranks hold
*different* experts, so the experts must be placed in DeepSpeed's own expert groups (`expert_groups.py`), and the
model must be in a form DeepSpeed accepts (docs/design.md, "Training"). This module does the second part:

- `adopt_ep_load`: the loading block's one hook into training (`loading.entry.TRAINING_HOOK`), at the end of every
  EP load inside the block: `record_ep_load`, then `make_deepspeed_ready` when DeepSpeed is signalled.
- `record_ep_load`: which EP group the rank is in, and fingerprints of its expert shards as loaded, so an
  overwritten shard can be caught later; the instance guards (`guard.py`) are attached to the model.
- `make_deepspeed_ready` (when DeepSpeed is signalled at load, or when the library hands the model to DeepSpeed):
  DTensor parameters become plain local Parameters (DeepSpeed can neither swap nor broadcast DTensors; the EP
  forward works the same on local tensors), the release's token dispatch serves each rank's own batch
  (`token_dispatch.py`), the expert shards get DeepSpeed's expert-parameter tags, and a one-shot guard is armed on
  the first forward.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate

from .. import experts
from ..errors import EpShimError
from ..log import logger
from ..releases.lines import training_refusal
from ..releases.support import transformers_version
from . import expert_groups, guard, token_dispatch
from .export import SavePretrainedGuard
from .record import RECORD_ATTR, EPModelRecord, record_of, unwrap

try:  # only the 5.17-5.18 EP hook needs it (see `_reduce_expert_outputs`)
    from transformers.distributed.tensor_parallel import _AllReduceForward
except ImportError:
    _AllReduceForward = None


def adopt_ep_load(model, ep_size: int, line, *, deepspeed_signalled: bool) -> None:
    record_ep_load(model, ep_size, line)
    if deepspeed_signalled:
        make_deepspeed_ready(model)


def record_ep_load(model, ep_size: int, line) -> EPModelRecord:
    expert_params = experts.expert_parameters(model)
    mesh = _ep_mesh(model, expert_params)
    rows = {name: experts.local_tensor(param).shape[0] * ep_size for name, param in expert_params.items()}
    record = EPModelRecord(ep_size, tuple(int(rank) for rank in mesh.mesh.flatten().tolist()), mesh, line,
                           experts.fingerprints(expert_params), rows)
    model.__dict__[RECORD_ATTR] = record
    guard.attach_instance_guards(model, record)
    return record


def _ep_mesh(model, expert_params):
    """This rank's EP group's 1-D device mesh, read from where this release keeps it."""
    for param in expert_params.values():
        mesh = getattr(param, "device_mesh", None)
        if mesh is not None:
            return mesh
    manager = getattr(model, "_mesh_manager", None)
    if manager is not None:
        return manager.get_mesh("ep")
    mesh = getattr(model, "_device_mesh", None)
    if mesh is not None:
        return mesh["tp"] if mesh.ndim > 1 and "tp" in (mesh.mesh_dim_names or ()) else mesh
    raise EpShimError(f"{type(model).__name__}: cannot find the expert-parallel mesh after the EP load")


def make_deepspeed_ready(model_or_engine) -> dict:
    """Idempotent: the first call converts the model in place. Returns {old parameter: its replacement} for the
    DTensor parameters it replaced (an optimizer built before must be re-pointed: `repoint_optimizer`)."""
    model = unwrap(model_or_engine)
    record = record_of(model)
    if record.deepspeed_ready:
        return {}
    reason = training_refusal(transformers_version())
    converted, replaced = _localise_dtensors(model)
    guard.drop_swap_guard(model)
    # its weights are now this rank's local shards, which transformers' save_pretrained would write as the model
    model.__dict__["save_pretrained"] = SavePretrainedGuard(model)
    if converted and record.line.expert_output_reduce_needs_dtensors:
        _reduce_expert_outputs(converted)
    if reason is None:
        # every rank feeds its own batch from here on; releases without the dispatcher keep their shared-batch EP
        # (training is refused there, inference stays as loaded)
        distributed_config = getattr(model.config, "distributed_config", None)
        token_dispatch.dispatch_own_batches(
            model, record.ep_mesh, ep_implementation=getattr(distributed_config, "ep_implementation", None))
        expert_groups.tag_expert_parameters(model, record.ep_size)
    record.deepspeed_ready = True
    if reason is not None:
        logger.warning(f"ep_ds_shim: loaded for inference only. {reason}; DeepSpeed training will be refused.")
    guard.arm(model, record)
    return replaced


def repoint_optimizer(optimizer, replaced: dict) -> None:
    """An optimizer built from the model's parameters before they were made local still holds the DTensors; point
    its parameter groups at their replacements (nothing else changes: no state exists before the first step)."""
    if optimizer is None or not replaced or not hasattr(optimizer, "param_groups"):
        return
    stale = [p for p in getattr(optimizer, "state", {}) if p in replaced]
    if stale:
        raise EpShimError(
            f"the optimizer already holds state for {len(stale)} of the model's DTensor parameters (it has stepped), "
            "so it cannot be moved to the local parameters DeepSpeed needs. Build the optimizer after "
            "ep_ds_shim.initialize / supply_deepspeed_groups has made the model DeepSpeed-ready, or before any step."
        )
    for group in optimizer.param_groups:
        group["params"] = [replaced.get(param, param) for param in group["params"]]


def _localise_dtensors(model) -> tuple[dict, dict]:
    """Replace DTensor parameters by plain Parameters holding this rank's local data.

    Expert shards (`Shard(0)` on the EP mesh) and replicated dense weights become local tensors; a dense weight
    that is *sharded* is tensor parallelism, which ZeRO cannot partition correctly, so it is refused.
    Returns the modules whose expert weights were sharded DTensors (with their mesh), and {old: new} parameters.
    """
    converted, replaced = {}, {}
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if not isinstance(param, DTensor):
                continue
            full_name = f"{module_name}.{name}" if module_name else name
            replicated = all(isinstance(p, Replicate) for p in param.placements)
            if not replicated and not experts.is_expert_parameter_name(full_name):
                raise EpShimError(
                    f"{full_name} is tensor-parallel sharded ({param.placements}); ep-ds-shim composes DeepSpeed "
                    "with expert parallelism only, dense layers must stay whole. Load with "
                    "ep_ds_shim.ep_from_pretrained_kwargs(...), which maps the TP plan to 'replicate'."
                )
            if not replicated:
                converted[module] = param.device_mesh
            local = torch.nn.Parameter(param.to_local().detach(), requires_grad=param.requires_grad)
            local.__dict__.update({k: v for k, v in param.__dict__.items() if k.startswith("_is_hf")})
            module._parameters[name] = local
            replaced[param] = local
    return converted, replaced


def _reduce_expert_outputs(converted: dict) -> None:
    """On releases whose EP hook all-reduces the experts' output only while their weights are DTensors, attach
    that reduction to each converted experts module, using the release's own autograd function."""
    if _AllReduceForward is None:
        raise EpShimError(
            "this release's EP hook needs DTensor expert weights to all-reduce expert outputs, and its "
            "_AllReduceForward could not be found; the shim cannot make the experts DeepSpeed-ready. "
            "Report it with `python -m ep_ds_shim doctor`."
        )
    for module, mesh in converted.items():
        group = mesh.get_group()

        def all_reduce_output(module, args, output, group=group):
            return _AllReduceForward.apply(output, group)

        module.register_forward_hook(all_reduce_output)
