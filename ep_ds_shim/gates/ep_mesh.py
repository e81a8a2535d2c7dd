"""Gate 6 (DP x EP only): the mesh a release builds for itself from `DistributedConfig`.

Upstream: releases from 5.15 on build their parallel mesh over the *whole* world (`initialize_distributed_mesh`)
and refuse when the parallel sizes do not multiply to the world size. Under ZeRO-3, the data-parallel dimension
belongs to DeepSpeed, not to transformers: with world = dp x ep, each data-parallel replica must load EP over its
own ``ep`` ranks, and transformers must not apply FSDP.
What the shim does: for an EP load under ZeRO-3 with world > ep, call the release's own
`initialize_distributed_mesh` with a copy of the config whose *replicate* dimension is sized ``world // ep``
(ranks ``[d*ep, (d+1)*ep)`` form replica ``d``, the `DPxEPLayout` convention). The meshes transformers slices
for TP/EP are then this replica's, while the config the model keeps still says "no data parallelism", so no
FSDP wrapping happens. With world == ep the gate does nothing.
"""

from __future__ import annotations

import copy

import wrapt

from .._state import block_active, current_load
from .._targets import Target
from . import Gate

GATE = Gate(
    name="initialize_distributed_mesh",
    target=Target("transformers.distributed.mixin", "initialize_distributed_mesh", "function", params=("distributed_config",)),
    upstream_under_zero3="one mesh over the whole world; refuses world = dp x ep",
    standard_path="the release's own meshes, with the replicate dimension sized to the DeepSpeed data-parallel size",
)

# Which DistributedConfig field is a pure replicate dimension of the mesh on each release: setting it on a
# *copy* sizes the mesh, while the model's own config keeps it at 1.
REPLICATE_FIELD = "dp_replicate_size"


def _replica_count(config) -> int:
    import torch.distributed as dist

    world = dist.get_world_size()
    used = config.pp_size * getattr(config, REPLICATE_FIELD, 1) * config.fsdp_size * config.tp_size
    return world // used if used and world % used == 0 else 1


def _build_meshes(wrapped, instance, args, kwargs):
    load = current_load.get()
    if load is None or not load.acts:
        return wrapped(*args, **kwargs)
    (config,) = args or (kwargs["distributed_config"],)
    replicas = _replica_count(config)
    if replicas == 1:
        return wrapped(*args, **kwargs)
    sized = copy.copy(config)
    setattr(sized, REPLICATE_FIELD, getattr(config, REPLICATE_FIELD, 1) * replicas)
    if GATE.name not in load.gates_taken:
        load.gates_taken.append(GATE.name)
    return wrapped(sized)


def wrap_mesh(original):
    return wrapt.FunctionWrapper(original, _build_meshes, enabled=block_active)
