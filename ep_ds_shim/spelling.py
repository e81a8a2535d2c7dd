"""One way to say "expert parallelism of size N" on every supported transformers release.

Releases disagree on the spelling (DESIGN §3):

- 5.6-5.14: ``DistributedConfig(enable_expert_parallel=True)`` plus ``device_mesh=`` (its size is the EP size).
- 5.15-5.22: ``DistributedConfig(enable_expert_parallel=True, tp_size=N)``; the flag alone raises (5.15-5.18)
  or silently leaves EP off (5.19-5.22).
- 5.23+: ``DistributedConfig(ep_size=N, tp_size=N, tp_plan=...)``; the flag alone means ``ep_size=1``.
  ``tp_size=N`` also switches on the default *tensor*-parallel plan, so every TP rule of the model is mapped
  to ``"replicate"``: dense layers stay whole and only the experts are split.

`ep_from_pretrained_kwargs` returns the keyword arguments for the installed release; pass them to
`from_pretrained` as they are.
"""

from __future__ import annotations

import torch.distributed as dist

from ._releases import family_for

REPLICATE = "replicate"

# How each release family spells "EP of size N" (what the doctor prints).
SPELLINGS = {
    "enable_expert_parallel+device_mesh": "DistributedConfig(enable_expert_parallel=True) + device_mesh=<1-D mesh of N ranks>",
    "enable_expert_parallel+tp_size": "DistributedConfig(enable_expert_parallel=True, tp_size=N)",
    "ep_size": "DistributedConfig(ep_size=N, tp_size=N, tp_plan={<every TP rule>: 'replicate'})",
}


def _resolve_config_and_class(model_ref, model_class):
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig

    config = model_ref if isinstance(model_ref, PreTrainedConfig) else AutoConfig.from_pretrained(model_ref)
    model_class = model_class or AutoModelForCausalLM
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is not None:  # an Auto class: the concrete class it would pick for this config
        model_class = mapping[type(config)]
    return config, model_class


def replicate_tp_plan(model_ref, *, model_class=None) -> dict[str, str]:
    """Every tensor-parallel rule the model would apply, mapped to "replicate" (keys as transformers 5.23
    resolves them on `model_class`: the head's own rules, then the base model's prefixed by its attribute)."""
    config, model_class = _resolve_config_and_class(model_ref, model_class)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    base_rules = dict(getattr(text_config, "base_model_tp_plan", None) or {})
    base_rules.setdefault("embed_tokens", REPLICATE)
    head_rules = dict(getattr(model_class, "_tp_plan", None) or {})
    prefix = getattr(model_class, "base_model_prefix", "")
    keys = set(head_rules)
    keys |= {rule if _is_base_model(model_class, config) else f"{prefix}.{rule}" for rule in base_rules}
    return dict.fromkeys(sorted(keys), REPLICATE)


def _is_base_model(model_class, config) -> bool:
    from transformers import AutoModel

    return AutoModel._model_mapping.get(type(config), None) is model_class


def ep_from_pretrained_kwargs(model_ref, ep_size: int, *, layout=None, model_class=None) -> dict:
    """`from_pretrained` keyword arguments for an EP load of size `ep_size` on the installed release.

    Args:
        model_ref: the checkpoint path / hub id or its config (needed on 5.23+ for the replicate TP plan).
        ep_size: number of ranks the experts are split over.
        layout: a `DPxEPLayout` when the world holds several data-parallel replicas (world > ep_size).
        model_class: the class you will call `from_pretrained` on (default `AutoModelForCausalLM`).
    """
    import transformers
    from transformers.distributed import DistributedConfig

    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 2:
        raise ValueError(f"ep_size must be an int >= 2 (EP splits experts over several ranks), got {ep_size!r}")
    family = family_for(transformers.__version__, allow_unverified=True)
    if layout is not None and layout.ep_size != ep_size:
        raise ValueError(f"layout has ep_size={layout.ep_size}, but ep_size={ep_size} was asked for")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
    if layout is None and world is not None and world != ep_size:
        raise ValueError(
            f"ep_size={ep_size} is smaller than the world ({world}): build a DPxEPLayout(ep_size) on every rank "
            "and pass layout=... so each data-parallel replica loads its own EP group."
        )

    kwargs: dict = {}
    if family.spelling == "enable_expert_parallel+device_mesh":
        kwargs["distributed_config"] = DistributedConfig(enable_expert_parallel=True)
        if layout is not None:
            kwargs["device_mesh"] = layout.ep_mesh
        else:
            kwargs["device_mesh"] = dist.init_device_mesh(_device_type(), (ep_size,))
    elif family.spelling == "enable_expert_parallel+tp_size":
        kwargs["distributed_config"] = DistributedConfig(enable_expert_parallel=True, tp_size=ep_size)
    elif family.spelling == "ep_size":
        kwargs["distributed_config"] = DistributedConfig(
            ep_size=ep_size, tp_size=ep_size, tp_plan=replicate_tp_plan(model_ref, model_class=model_class)
        )
    else:  # pragma: no cover - a new family must add its spelling here
        raise NotImplementedError(f"no EP spelling for release family {family.name}")
    # world > ep on releases that build their own world-sized mesh: gates/ep_mesh.py sizes it inside the block
    # (ranks [d*ep, (d+1)*ep) form replica d, the DPxEPLayout convention); releases without that are refused.
    return kwargs


def _device_type() -> str:
    from .layout import _default_device_type

    return _default_device_type()
