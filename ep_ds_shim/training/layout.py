"""The DP x EP layout: world = data-parallel size x expert-parallel size.

Ranks ``[d*ep, (d+1)*ep)`` form EP group ``d``: expert parallelism splits the experts over its ``ep`` ranks, so
the ``dp`` groups each hold every expert once. Every rank trains on its *own* batch: the release's token dispatcher
sends each token to its experts' rank and back (`token_dispatch.py`). For DeepSpeed, every rank is a data-parallel
rank of the dense layers (ZeRO-3 partitions them over all ranks), and an expert shard's data-parallel group is the
ranks holding the same experts, ``{e, e+ep, e+2ep, ...}`` for EP rank ``e`` (`expert_groups.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from ..distributed import default_device_type
from ..errors import EpShimError, EPRequestError
from ..releases.ep_request import ep_from_pretrained_kwargs


class DPxEPLayout:
    """Build once per process, on every rank (it creates process groups, a collective).

    >>> layout = DPxEPLayout(ep_size=2)            # world 4 -> dp 2 x ep 2
    >>> model = AutoModelForCausalLM.from_pretrained(path, **layout.from_pretrained_kwargs(path))
    >>> engine, *_ = ep_ds_shim.initialize(model=model, layout=layout, optimizer=opt, config=ds_config)
    >>> loader = DataLoader(dataset, sampler=layout.sampler(dataset), batch_size=2)   # every rank its own batches
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

    def mpu(self):
        """Removed in 0.3.0: DeepSpeed gets no `mpu` any more (see the error)."""
        raise EpShimError(
            "DPxEPLayout.mpu() was removed in ep-ds-shim 0.3.0: DeepSpeed's data-parallel group is now every rank "
            "(ZeRO-3 partitions the dense weights over all of them) and the experts go into DeepSpeed's own expert "
            "groups. Call ep_ds_shim.initialize(model=..., layout=layout, optimizer=..., config=...) instead of "
            "deepspeed.initialize(..., mpu=layout.mpu()), and feed every rank its own batch (layout.sampler)."
        )

    def from_pretrained_kwargs(self, model_ref, *, model_class=None) -> dict:
        """The `from_pretrained` keyword arguments that load EP over this layout's ``ep`` dimension on the
        installed transformers release (see `releases/spelling.py`)."""
        return ep_from_pretrained_kwargs(model_ref, self.ep_size, layout=self, model_class=model_class)

    def sampler(self, dataset, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        """A DistributedSampler over every rank: each rank trains on its own batches."""
        from torch.utils.data import DistributedSampler

        return DistributedSampler(
            dataset, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
