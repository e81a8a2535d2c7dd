"""DP x EP only: the mesh a release builds for itself from `DistributedConfig` (not a ZeRO-3 gate).

Upstream: releases from 5.15 on build their parallel mesh over the *whole* world (`initialize_distributed_mesh`)
and refuse when the parallel sizes do not multiply to the world size. Under ZeRO-3, the data-parallel dimension
belongs to DeepSpeed, not to transformers: with world = dp x ep, each data-parallel replica must load EP over its
own ``ep`` ranks, and transformers must not apply FSDP.
What the shim does: for an EP load inside the block with world > ep (ZeRO-3 signalled or not: upstream refuses
that load outright, and DeepSpeed may take the model later, e.g. the Trainer's load-then-configure order), call the release's own
`initialize_distributed_mesh` with a copy of the config whose *replicate* dimension is sized ``world // ep``
(ranks ``[d*ep, (d+1)*ep)`` form replica ``d``, the `DPxEPLayout` convention). The meshes transformers slices
for TP/EP are then this replica's, while the config the model keeps still says "no data parallelism", so no
FSDP wrapping happens. With world == ep the gate does nothing.
"""

from __future__ import annotations

import copy

import torch.distributed as dist

from ..patching.targets import Target
from .context import current_load

TARGET = Target("transformers.distributed.mixin", "initialize_distributed_mesh", "function", params=("distributed_config",))
NAME = "initialize_distributed_mesh"

# Which DistributedConfig field is a pure replicate dimension of the mesh on each release: setting it on a
# *copy* sizes the mesh, while the model's own config keeps it at 1.
REPLICATE_FIELD = "dp_replicate_size"


def _replica_count(config) -> int:
    world = dist.get_world_size()
    used = config.pp_size * getattr(config, REPLICATE_FIELD, 1) * config.fsdp_size * config.tp_size
    return world // used if used and world % used == 0 else 1


def build_meshes(wrapped, instance, args, kwargs):
    load = current_load.get()
    if load is None or not load.ep_size or load.ep_size < 2:
        return wrapped(*args, **kwargs)
    (config,) = args or (kwargs["distributed_config"],)
    replicas = _replica_count(config)
    if replicas == 1:
        return wrapped(*args, **kwargs)
    sized = copy.copy(config)
    setattr(sized, REPLICATE_FIELD, getattr(config, REPLICATE_FIELD, 1) * replicas)
    load.took(NAME)
    return wrapped(sized)
