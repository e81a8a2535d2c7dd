"""Refuse, before any collective, an EP `from_pretrained` that cannot work. Every rank computes the same answer
from the same arguments, so every rank raises and none is left waiting in a collective."""

from __future__ import annotations

import os

import torch.distributed as dist
from transformers import PreTrainedConfig

from .. import experts
from ..distributed import initialised
from ..errors import EPRequestError
from ..releases.support import transformers_version

# EP-plan styles whose work happens outside the expert shards and that the DeepSpeed hand-over does not carry:
# DeepSpeed reduces gradients over the data-parallel group only, never over an EP group.
UNCARRIED_EP_STYLES = {
    "replicated_with_grad_allreduce": "replicated on every EP rank, with its gradient summed over the EP group",
}

# Tensor-parallel styles that split a weight over the ranks. In an EP plan on a module outside the experts they
# split a dense weight over the EP group, which ZeRO-3 would then own split (gemma4's plans split its dense MLP).
DENSE_SPLITTING_STYLES = frozenset({
    "colwise", "rowwise", "packed_colwise", "packed_rowwise", "colwise_rep", "rowwise_rep", "rowwise_split_input",
    "colwise_gather_output", "embedding_colwise", "embedding_rowwise", "mla_kv_a_proj",
})

_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def model_source(args, kwargs):
    """What `from_pretrained` was asked to load: a config object, or the path / hub id."""
    config = kwargs.get("config")
    if config is not None and not isinstance(config, (str, os.PathLike)):
        return config
    return config if config is not None else (args[0] if args else kwargs.get("pretrained_model_name_or_path"))


def load_config(cls, args, kwargs):
    """The model config the call will use (read from the checkpoint when it was not passed)."""
    source = model_source(args, kwargs)
    if isinstance(source, PreTrainedConfig):
        return source
    if source is None or cls.config_class is None:
        return None
    download = {key: kwargs[key] for key in _DOWNLOAD_KWARGS if key in kwargs}
    return cls.config_class.from_pretrained(source, **download)


def validate_request(cls, args, kwargs, ep_size: int, line) -> None:
    """Raise `EPRequestError` for an EP load of size `ep_size` that cannot work on release line `line`."""
    name = cls.__name__
    if not initialised():
        raise EPRequestError(
            f"{name}.from_pretrained asks for expert parallelism (ep_size={ep_size}) but torch.distributed has no "
            "initialised process group. Call torch.distributed.init_process_group(...) (or "
            "deepspeed.init_distributed()) on every rank before loading."
        )
    world = dist.get_world_size()
    if world % ep_size:
        raise EPRequestError(
            f"{name}: ep_size={ep_size} does not divide the world size {world}. Use an ep_size that divides it "
            "(world = data-parallel size x ep_size); ep_ds_shim.DPxEPLayout builds matching groups."
        )
    if world > ep_size and not line.replica_mesh:
        raise EPRequestError(
            f"{name}: ep_size={ep_size} on a world of {world} (data parallel x expert parallel) is not supported on "
            f"transformers {transformers_version()}: this release builds its parallel mesh over the whole world and "
            "the shim has no verified way to restrict it to one EP group. Use ep_size = world size here, or "
            "transformers 5.23 or newer (`python -m ep_ds_shim doctor` says whether a release has DP x EP)."
        )
    config = load_config(cls, args, kwargs)
    if config is None:
        return
    plan = experts.ep_plan_of(cls, config)
    if not plan:
        raise EPRequestError(
            f"{name} (model_type={getattr(config, 'model_type', '?')!r}) has no expert-parallel plan in this "
            "transformers release, so an EP load would silently keep every expert on every rank. Use a model "
            "family with an EP plan (`python -m ep_ds_shim verify` checks every one this release has) or load it "
            "without EP."
        )
    refusal = plan_refusal(cls, config)
    if refusal:
        raise EPRequestError(refusal)
    num_experts = experts.num_experts_of(config)
    if num_experts is not None and num_experts % ep_size:
        raise EPRequestError(
            f"{name} has {num_experts} experts, which cannot be split evenly over ep_size={ep_size} ranks. "
            f"Choose an ep_size that divides {num_experts}."
        )


def plan_refusal(cls, config) -> str | None:
    """Why the EP plan of `cls` for `config` cannot train under DeepSpeed (refused before the load), or None."""
    name = cls.__name__
    model_type = getattr(config, "model_type", "?")
    plan = experts.ep_plan_of(cls, config)
    uncarried = {key: style for key, style in plan.items() if style in UNCARRIED_EP_STYLES}
    if uncarried:
        key, style = next(iter(sorted(uncarried.items())))
        return (
            f"{name} (model_type={model_type!r}): its expert-parallel plan keeps {key!r} "
            f"{UNCARRIED_EP_STYLES[style]} ({style!r}). Under DeepSpeed that sum would not happen (DeepSpeed reduces "
            "gradients over the data-parallel group only), so training would be silently wrong. ep-ds-shim does not "
            "support this family; train it without DeepSpeed, or load it without EP."
        )
    dense = {key: style for key, style in plan.items()
             if style in DENSE_SPLITTING_STYLES and experts.EXPERT_MODULE_NAME not in key.split(".")}
    if dense:
        key, style = next(iter(sorted(dense.items())))
        return (
            f"{name} (model_type={model_type!r}): its expert-parallel plan also splits dense weights over the EP "
            f"ranks ({key!r}: {style!r}, {len(dense)} rule(s) outside the experts). ep-ds-shim keeps dense layers "
            "whole for DeepSpeed, which partitions them itself; this family's EP cannot be composed with ZeRO-3. "
            "Nothing was loaded. Train it without EP, or without DeepSpeed."
        )
    return None
