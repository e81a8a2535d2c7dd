"""The DP x EP layout: world = data-parallel size x expert-parallel size.

Ranks ``[d*ep, (d+1)*ep)`` form data-parallel replica ``d``; inside it, expert parallelism splits the experts
over its ``ep`` ranks, which must all see the *same* batch (transformers' EP is like tensor parallelism in
this respect). DeepSpeed's ZeRO-3 must only ever treat ranks holding the *same* experts as replicas: its
data-parallel group is ``{e, e+ep, e+2ep, ...}`` for EP rank ``e``, and its model-parallel group is the EP
group (so the global gradient norm counts dense weights once and every expert shard once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from ..distributed import default_device_type
from ..errors import EPRequestError
from ..releases.ep_request import ep_from_pretrained_kwargs


class DPxEPLayout:
    """Build once per process, on every rank (it creates process groups, a collective).

    >>> layout = DPxEPLayout(ep_size=2)            # world 4 -> dp 2 x ep 2
    >>> model = AutoModelForCausalLM.from_pretrained(path, **layout.from_pretrained_kwargs(path))
    >>> engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config, mpu=layout.mpu())
    """

    def __init__(self, ep_size: int, *, device_type: str | None = None):
        if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1:
            raise EPRequestError(f"ep_size must be a positive int, got {ep_size!r}")
        if not (dist.is_available() and dist.is_initialized()):
            raise EPRequestError(
                "DPxEPLayout needs an initialised torch.distributed process group on every rank; call "
                "torch.distributed.init_process_group(...) or deepspeed.init_distributed() first."
            )
        world = dist.get_world_size()
        if world % ep_size:
            raise EPRequestError(
                f"ep_size={ep_size} does not divide the world size {world}; world = dp_size x ep_size."
            )
        self.world_size = world
        self.ep_size = ep_size
        self.dp_size = world // ep_size
        self.rank = dist.get_rank()
        self.dp_rank, self.ep_rank = divmod(self.rank, ep_size)
        self.device_type = device_type or default_device_type()
        self.mesh = dist.init_device_mesh(self.device_type, (self.dp_size, ep_size), mesh_dim_names=("dp", "ep"))
        self.ep_mesh = self.mesh["ep"]
        self.ep_group = self.mesh.get_group("ep")
        self.dp_group = self.mesh.get_group("dp")
        self.ep_ranks = tuple(range(self.dp_rank * ep_size, (self.dp_rank + 1) * ep_size))
        self.dp_ranks = tuple(range(self.ep_rank, world, ep_size))

    def __repr__(self) -> str:
        return (
            f"DPxEPLayout(world={self.world_size}, dp={self.dp_size}, ep={self.ep_size}, rank={self.rank}, "
            f"dp_rank={self.dp_rank}, ep_rank={self.ep_rank})"
        )

    def mpu(self) -> "DPxEPGroups":
        """The object to pass as ``deepspeed.initialize(..., mpu=...)``."""
        return DPxEPGroups(self)

    def from_pretrained_kwargs(self, model_ref, *, model_class=None) -> dict:
        """The `from_pretrained` keyword arguments that load EP over this layout's ``ep`` dimension on the
        installed transformers release (see `releases/spelling.py`)."""
        return ep_from_pretrained_kwargs(model_ref, self.ep_size, layout=self, model_class=model_class)

    def sampler(self, dataset, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        """A DistributedSampler over data-parallel replicas: every rank of an EP group gets the same batches."""
        from torch.utils.data import DistributedSampler

        return DistributedSampler(
            dataset, num_replicas=self.dp_size, rank=self.dp_rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )


@dataclass(frozen=True)
class DPxEPGroups:
    """A Megatron-style ``mpu`` for DeepSpeed: data parallel = same-expert ranks, model parallel = the EP group.

    DeepSpeed uses the data-parallel group for ZeRO-3 partitioning, its initial broadcast and gradient
    averaging, and the model-parallel group (with the ``model_parallel`` attribute the shim sets on expert
    weights) to sum the gradient norm, which gradient clipping (on by default: 1.0) depends on.
    """

    layout: DPxEPLayout

    def get_data_parallel_group(self):
        return self.layout.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.layout.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.layout.dp_size

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.layout.dp_ranks)

    def get_model_parallel_group(self):
        return self.layout.ep_group

    def get_model_parallel_rank(self) -> int:
        return self.layout.ep_rank

    def get_model_parallel_world_size(self) -> int:
        return self.layout.ep_size
