"""Every rank on its own batch: the release's own expert-parallel token dispatcher, fed per rank.

transformers (5.20+) routes tokens to the experts' ranks with `ep_dispatch_experts`, an all-to-all dispatcher
(`EpDispatchExpertsParallel`). Its `tp_mesh` argument names the ranks that hold the *same* batch: the EP request
this library loads with (``tp_size=ep_size``, every TP rule "replicate", so dense layers stay whole) makes that the
whole EP group, so each rank dispatches only its slice of a batch it shares with the group, and every rank computes
the dense layers on the same tokens.

For DeepSpeed, every rank is a data-parallel rank of the dense layers (ZeRO-3 partitions them over all ranks) and
trains on its own batch. So at the hand-over each experts module that the release's EP plan gives the
``ep_dispatch_experts`` style gets that style's forward installed again, by the release's own
`install_forward`, with a one-rank `tp_mesh`: the all-to-all then sends each rank's own tokens to the experts'
owners and brings the results back, with gradients flowing through the exchange both ways (the same path upstream
takes for ranks holding different batches). Nothing here computes an expert or moves a token itself.
"""

from __future__ import annotations

import functools

import torch.distributed as dist

from ..errors import EpShimError

DISPATCH_STYLE = "ep_dispatch_experts"


def _parallel_styles():
    """The release's registry of parallel styles and its plan-key helper (moved modules in 5.23)."""
    try:  # 5.23+
        from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES, replace_layer_number_by_wildcard
    except ImportError:  # 5.20-5.22
        from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES, replace_layer_number_by_wildcard
    return ALL_PARALLEL_STYLES, replace_layer_number_by_wildcard


@functools.lru_cache(maxsize=None)
def _one_rank_mesh(device_type: str, world: int):
    """A mesh of this rank alone (the second dimension of a world x 1 mesh), built once per process: the `tp_mesh`
    that tells the dispatcher no other rank holds this rank's batch. A collective (every rank builds its mesh)."""
    return dist.init_device_mesh(device_type, (world, 1), mesh_dim_names=("ep_ds_shim_ranks", "ep_ds_shim_own_batch"))[
        "ep_ds_shim_own_batch"
    ]


def dispatch_modules(model) -> dict[str, object]:
    """The modules the model's EP plan gives the token-dispatch style, by name."""
    styles, wildcard = _parallel_styles()
    plan = getattr(model, "ep_plan", None) or {}
    return {name: module for name, module in model.named_modules() if plan.get(wildcard(name)) == DISPATCH_STYLE}


def _is_release_dispatch(forward) -> bool:
    """`module.forward` is the one the release's dispatch style installed (not someone else's wrapper)."""
    return getattr(forward, "__qualname__", "").endswith("install_forward.<locals>.ep_forward")


def dispatch_own_batches(model, ep_mesh, *, ep_implementation: str | None = None) -> int:
    """Re-install the release's token dispatch on every ``ep_dispatch_experts`` module of `model` with a one-rank
    batch mesh, so each rank's own tokens reach the experts. Returns how many modules were re-installed.

    Idempotent: modules already dispatching per rank are left alone. A collective the first time in a process."""
    modules = dispatch_modules(model)
    if not modules:
        raise EpShimError(
            f"{type(model).__name__}: its expert-parallel plan gives no module the {DISPATCH_STYLE!r} style, so its "
            "ranks cannot train on their own batches (the experts' output is summed over ranks that must share one "
            "batch). ep-ds-shim trains such models only with a plan that dispatches tokens; load it without "
            "DeepSpeed, or use a model family whose plan has `ep_dispatch_experts` (`python -m ep_ds_shim verify` "
            "lists them)."
        )
    styles, _ = _parallel_styles()
    style = styles[DISPATCH_STYLE]
    own_batch = _one_rank_mesh(ep_mesh.device_type, dist.get_world_size())
    kwargs = {} if ep_implementation is None else {"ep_implementation": ep_implementation}
    done = 0
    for name, module in modules.items():
        if getattr(module, "_ep_ds_shim_own_batch", False):
            continue
        installed = module.__dict__.get("forward")
        if not _is_release_dispatch(installed):
            raise EpShimError(
                f"{name}.forward is {installed!r}, not the token dispatch the release installs for its "
                f"{DISPATCH_STYLE!r} style (another library wrapped it, or the release changed how it dispatches); "
                "ep-ds-shim never replaces another wrapper. Remove that wrapper before DeepSpeed takes the model, or "
                "report it with `python -m ep_ds_shim doctor`."
            )
        del module.__dict__["forward"]  # back to the experts' own forward, which the style wraps again
        try:
            style.install_forward(module, ep_mesh, tp_mesh=own_batch, **kwargs)
        except ValueError as error:  # e.g. an ep_implementation that needs a batch shared by the EP group
            module.forward = installed
            raise EpShimError(
                f"{name}: the release's token dispatch cannot serve ranks that hold their own batches ({error}). "
                "Use the default DistributedConfig(ep_implementation='auto') or 'all_to_all'."
            ) from error
        module._ep_ds_shim_own_batch = True
        done += 1
    return done
