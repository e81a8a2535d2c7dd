"""How each run of transformers releases says "expert parallelism of size N", both ways.

Releases disagree on the spelling (docs/design.md, "Releases"):

- 5.6-5.14: ``DistributedConfig(enable_expert_parallel=True)`` plus ``device_mesh=`` (its size is the EP size).
- 5.15-5.22: ``DistributedConfig(enable_expert_parallel=True, tp_size=N)``; the flag alone raises (5.15-5.18)
  or silently leaves EP off (5.20-5.22).
- 5.23+: ``DistributedConfig(ep_size=N, tp_size=N, tp_plan=...)``; the flag alone means ``ep_size=1``.
  ``tp_size=N`` also switches on the default *tensor*-parallel plan, so every TP rule of the model is mapped
  to ``"replicate"``: dense layers stay whole and only the experts are split.

Each spelling is one object that both builds a request (`build`, behind `ep_from_pretrained_kwargs`) and reads
one back from a `from_pretrained` call (`requested_ep_size`, used by the loading block), so the two can never
disagree.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig
from transformers.distributed import DistributedConfig
from transformers.initialization import no_init_weights
from transformers.modeling_utils import set_zero3_state

from ..distributed import default_device_type, world_size

REPLICATE = "replicate"


class EPSpelling:
    """One way of asking `from_pretrained` for EP of size N."""

    summary = ""  # how the request reads, for the doctor

    def build(self, ep_size: int, *, model_ref, model_class, ep_mesh) -> dict:
        """The `from_pretrained` keyword arguments for EP of size `ep_size` (`ep_mesh`: the EP group's mesh when
        the world holds several data-parallel replicas, else None)."""
        raise NotImplementedError

    def requested_ep_size(self, config, kwargs: dict) -> int | None:
        """The EP size a `from_pretrained` call asks for, or None (no EP). `config` is the call's
        `distributed_config`, normalised to a `DistributedConfig`; `kwargs` the call's other arguments."""
        if config is None:
            return None
        ep_size = getattr(config, "ep_size", None)
        if ep_size is not None:  # 5.19+: the config resolved any legacy flag into ep_size already
            return ep_size if ep_size > 1 else None
        if not getattr(config, "enable_expert_parallel", False):
            return None
        return self._flag_ep_size(config, kwargs)

    def _flag_ep_size(self, config, kwargs: dict) -> int | None:
        return getattr(config, "tp_size", None)


class FlagWithDeviceMesh(EPSpelling):
    """5.6-5.14: the EP group is the device mesh (its "tp" dimension on a 2-D mesh)."""

    summary = "DistributedConfig(enable_expert_parallel=True) + device_mesh=<1-D mesh of N ranks>"

    def build(self, ep_size, *, model_ref, model_class, ep_mesh):
        mesh = ep_mesh if ep_mesh is not None else dist.init_device_mesh(default_device_type(), (ep_size,))
        return {"distributed_config": DistributedConfig(enable_expert_parallel=True), "device_mesh": mesh}

    def _flag_ep_size(self, config, kwargs):
        mesh = kwargs.get("device_mesh")
        if mesh is not None:
            if mesh.ndim > 1 and "tp" in (mesh.mesh_dim_names or ()):
                mesh = mesh["tp"]
            return mesh.size()
        return kwargs.get("tp_size") or getattr(config, "tp_size", None) or world_size()


class FlagWithTpSize(EPSpelling):
    """5.15-5.22: the flag plus ``tp_size=N``; the release builds the mesh itself."""

    summary = "DistributedConfig(enable_expert_parallel=True, tp_size=N)"

    def build(self, ep_size, *, model_ref, model_class, ep_mesh):
        return {"distributed_config": DistributedConfig(enable_expert_parallel=True, tp_size=ep_size)}


class EpSizeWithReplicatePlan(EPSpelling):
    """5.23+: ``ep_size=N, tp_size=N`` and every TP rule mapped to "replicate"."""

    summary = "DistributedConfig(ep_size=N, tp_size=N, tp_plan={<every TP rule>: 'replicate'})"

    def build(self, ep_size, *, model_ref, model_class, ep_mesh):
        plan = replicate_tp_plan(model_ref, model_class=model_class)
        return {"distributed_config": DistributedConfig(ep_size=ep_size, tp_size=ep_size, tp_plan=plan)}


def resolve_config_and_class(model_ref, model_class=None):
    """The config of `model_ref` (a path / hub id or a config) and the concrete class `model_class` (default
    `AutoModelForCausalLM`) would instantiate for it."""
    config = model_ref if isinstance(model_ref, PreTrainedConfig) else AutoConfig.from_pretrained(model_ref)
    model_class = model_class or AutoModelForCausalLM
    mapping = getattr(model_class, "_model_mapping", None)
    if mapping is not None:  # an Auto class: the concrete class it would pick for this config
        model_class = mapping[type(config)]
    return config, model_class


def replicate_tp_plan(model_ref, *, model_class=None) -> dict[str, str]:
    """Every tensor-parallel rule the model would apply, mapped to "replicate".

    The keys are the ones transformers itself gives an *instance* of `model_class` (`PreTrainedModel.tp_plan`,
    filled by `init_parallel_plans` in `post_init`): the head's own rules, then each sub-model's rules prefixed by
    its attribute path (``model.`` for a causal LM, ``model.language_model.`` for a multimodal head). They are read
    from a model built on the meta device (no memory, no weights); `set_zero3_state()` keeps the nested
    `from_config` calls of composite models out of `zero.Init` when ZeRO-3 is already signalled.
    """
    config, model_class = resolve_config_and_class(model_ref, model_class)
    with torch.device("meta"), no_init_weights(), set_zero3_state():
        model = model_class(copy.deepcopy(config))
    keys = set(model.tp_plan or {})
    if not keys:  # tp_size=N needs a non-empty plan; replicating the input embeddings changes nothing
        embeddings = model.get_input_embeddings()
        keys = {name for name, module in model.named_modules() if module is embeddings}
    return dict.fromkeys(sorted(keys), REPLICATE)
