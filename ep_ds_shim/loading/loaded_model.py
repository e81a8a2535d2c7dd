"""What an EP load must have produced, checked before anything uses the model."""

from __future__ import annotations

from .. import experts
from ..errors import EpShimError


def check_loaded_model(model, ep_size: int) -> None:
    """The loaded EP model must hold real tensors and a 1/ep_size slice of every expert tensor."""
    leftovers = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if leftovers:
        raise EpShimError(
            f"the EP load left {len(leftovers)} tensor(s) on the meta device (e.g. {leftovers[:3]}): the standard "
            "path did not materialise them on this release. Report it with `python -m ep_ds_shim doctor`."
        )
    num_experts = experts.num_experts_of(model.config)
    expert_params = experts.expert_parameters(model)
    if num_experts is None or not expert_params:
        raise EpShimError(
            f"{type(model).__name__}: found no expert weights to check after the EP load "
            f"(experts declared: {num_experts}); refusing to continue with an unverified layout."
        )
    expected = num_experts // ep_size
    wrong = {
        name: tuple(experts.local_tensor(param).shape)
        for name, param in expert_params.items()
        if experts.local_tensor(param).shape[0] != expected
    }
    if wrong:
        raise EpShimError(
            f"{type(model).__name__}: after the EP load these expert tensors do not hold {expected} of {num_experts} "
            f"experts on this rank: {dict(list(wrong.items())[:4])}. The release's EP plan did not shard them; "
            "nothing was trained."
        )
