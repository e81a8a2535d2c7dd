"""The `from_pretrained` scope: decide whether a load is an EP load under ZeRO-3, check its arguments before any
collective runs, and make sure the loaded model is what an EP-only load gives.

`from_pretrained` is the only place that sees `distributed_config` / `device_mesh`; the gates below it are
called positionally. So the entry wrapper records the request in a ContextVar (`_state.current_load`) and the
gates read it from there.
"""

from __future__ import annotations

import os
import warnings

import wrapt

from . import experts as _experts
from ._releases import Family
from ._state import LoadRecord, block_active, loading, translating_legacy_spelling
from ._targets import Target
from .errors import EPRequestError, EpShimError
from .gates import legacy_ep_flag

ENTRY = Target(
    "transformers.modeling_utils:PreTrainedModel",
    "from_pretrained",
    "classmethod",
    leading_params=("cls", "pretrained_model_name_or_path", "model_args"),
)

_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def logger():
    # Through transformers' own logger tree, so its verbosity settings apply to us too.
    from transformers.utils import logging

    return logging.get_logger("transformers.ep_ds_shim")


def zero3_signalled() -> bool:
    """What transformers itself answers: read from the defining module, which the shim never patches."""
    from transformers.integrations import deepspeed as hf_deepspeed

    return bool(hf_deepspeed.is_deepspeed_zero3_enabled())


def _normalised_distributed_config(value):
    if isinstance(value, dict):
        from transformers.distributed import DistributedConfig

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return DistributedConfig.from_dict(value)
    return value


def _world_size() -> int | None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    env = os.environ.get("WORLD_SIZE")
    return int(env) if env else None


def requested_ep_size(family: Family, config, kwargs: dict) -> int | None:
    """The expert-parallel size a `from_pretrained` call asks for on this release family, or None (no EP).
    `config` is the call's `distributed_config`, normalised to a `DistributedConfig`."""
    if config is None:
        return None
    ep_size = getattr(config, "ep_size", None)
    if ep_size is not None:  # 5.19+: the config resolved the legacy flag into ep_size already
        return ep_size if ep_size > 1 else None
    if not getattr(config, "enable_expert_parallel", False):
        return None
    if family.spelling == "enable_expert_parallel+tp_size":
        return getattr(config, "tp_size", None)
    # 5.6-5.14: the EP group is the device mesh's "tp" dimension, or one built over tp_size / the world.
    mesh = kwargs.get("device_mesh")
    if mesh is not None:
        if mesh.ndim > 1 and "tp" in (mesh.mesh_dim_names or ()):
            mesh = mesh["tp"]
        return mesh.size()
    return kwargs.get("tp_size") or getattr(config, "tp_size", None) or _world_size()


def _load_config(cls, args, kwargs):
    from transformers import PreTrainedConfig

    config = kwargs.get("config")
    if isinstance(config, PreTrainedConfig):
        return config
    source = config if isinstance(config, (str, os.PathLike)) else (args[0] if args else kwargs.get("pretrained_model_name_or_path"))
    if source is None or cls.config_class is None:
        return None
    download = {key: kwargs[key] for key in _DOWNLOAD_KWARGS if key in kwargs}
    return cls.config_class.from_pretrained(source, **download)


def validate_request(cls, args, kwargs, ep_size: int, family: Family | None = None) -> None:
    """Refuse, before any collective, an EP load that cannot work. Same answer on every rank, so no rank hangs."""
    import torch.distributed as dist

    name = cls.__name__
    if not (dist.is_available() and dist.is_initialized()):
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
    if world > ep_size and family is not None and family.dp_x_ep is None:
        raise EPRequestError(
            f"{name}: ep_size={ep_size} on a world of {world} (data parallel x expert parallel) is not supported on "
            f"transformers {_transformers_version()}: this release builds its parallel mesh over the whole world and "
            "the shim has no verified way to restrict it to one EP group. Use ep_size = world size here, or a "
            "release listed with DP x EP support in docs/support-matrix.md."
        )
    config = _load_config(cls, args, kwargs)
    if config is None:
        return
    plan = _experts.ep_plan_of(cls, config)
    if not plan:
        raise EPRequestError(
            f"{name} (model_type={getattr(config, 'model_type', '?')!r}) has no expert-parallel plan in this "
            "transformers release, so an EP load would silently keep every expert on every rank. Use a model "
            "family with an EP plan (see docs/support-matrix.md) or load it without EP."
        )
    num_experts = _experts.num_experts_of(config)
    if num_experts is not None and num_experts % ep_size:
        raise EPRequestError(
            f"{name} has {num_experts} experts, which cannot be split evenly over ep_size={ep_size} ranks. "
            f"Choose an ep_size that divides {num_experts}."
        )


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _entry_wrapper(family: Family):
    def from_pretrained(wrapped, cls, args, kwargs):
        requested = _normalised_distributed_config(kwargs.get("distributed_config"))
        if translating_legacy_spelling() and legacy_ep_flag.legacy_flag_without_ep(requested):
            kwargs = _translated_legacy_spelling(cls, args, kwargs)
            requested = _normalised_distributed_config(kwargs.get("distributed_config"))
        ep_size = requested_ep_size(family, requested, kwargs)
        record = LoadRecord(cls.__name__, ep_size, zero3_signalled())
        if ep_size is None and legacy_ep_flag.legacy_flag_without_ep(requested):
            if record.zero3:
                raise EPRequestError(legacy_ep_flag.message("is refused under ZeRO-3"))
            warnings.warn(legacy_ep_flag.message("loads WITHOUT expert parallelism"), UserWarning, stacklevel=3)
        if record.acts:
            validate_request(cls, args, kwargs, ep_size, family)
        with loading(record):
            result = wrapped(*args, **kwargs)
        if record.acts:
            model = result[0] if isinstance(result, tuple) else result
            from .zero3 import adopt_ep_model

            adopt_ep_model(model, ep_size, family)
            logger().info(
                f"ep_ds_shim: EP load of {record.model_class} (ep_size={ep_size}) under ZeRO-3 took the standard "
                f"path at: {', '.join(record.gates_taken) or 'no gate'}"
            )
        return result

    return from_pretrained


def _translated_legacy_spelling(cls, args, kwargs) -> dict:
    """The call's legacy `DistributedConfig(enable_expert_parallel=True)` (+ `device_mesh`), which this release
    would load without EP, rewritten to this release's EP spelling (unchanged when there is no EP to ask for)."""
    mesh = kwargs.get("device_mesh")
    ep_size = mesh.size() if mesh is not None else _world_size()
    if not ep_size or ep_size < 2:
        return kwargs
    from .spelling import ep_from_pretrained_kwargs

    config = kwargs.get("config")
    model_ref = config if config is not None and not isinstance(config, (str, os.PathLike)) else (
        args[0] if args else kwargs.get("pretrained_model_name_or_path"))
    translated = {k: v for k, v in kwargs.items() if k not in ("distributed_config", "device_mesh", "tp_size", "tp_plan")}
    translated.update(ep_from_pretrained_kwargs(model_ref, ep_size, model_class=cls))
    logger().warning(
        f"ep_ds_shim: translated DistributedConfig(enable_expert_parallel=True) to this release's EP spelling "
        f"(ep_size={ep_size}), which would otherwise load {cls.__name__} without expert parallelism."
    )
    return translated


def wrap_entry(original, family: Family):
    return wrapt.FunctionWrapper(original, _entry_wrapper(family), enabled=block_active)


def check_loaded_model(model, ep_size: int) -> None:
    """The loaded EP model must hold real tensors and a 1/ep_size slice of every expert tensor."""
    leftovers = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if leftovers:
        raise EpShimError(
            f"the EP load left {len(leftovers)} tensor(s) on the meta device (e.g. {leftovers[:3]}): the standard "
            "path did not materialise them on this release. Report it with `python -m ep_ds_shim doctor`."
        )
    num_experts = _experts.num_experts_of(model.config)
    expert_params = _experts.expert_parameters(model)
    if num_experts is None or not expert_params:
        raise EpShimError(
            f"{type(model).__name__}: found no expert weights to check after the EP load "
            f"(experts declared: {num_experts}); refusing to continue with an unverified layout."
        )
    expected = num_experts // ep_size
    wrong = {
        name: tuple(_experts.local_tensor(param).shape)
        for name, param in expert_params.items()
        if _experts.local_tensor(param).shape[0] != expected
    }
    if wrong:
        raise EpShimError(
            f"{type(model).__name__}: after the EP load these expert tensors do not hold {expected} of {num_experts} "
            f"experts on this rank: {dict(list(wrong.items())[:4])}. The release's EP plan did not shard them; "
            "nothing was trained."
        )
