"""`ep_from_pretrained_kwargs`: the EP request for the installed release, built by its release line's spelling."""

from __future__ import annotations


from ..distributed import world_size
from ..errors import EPRequestError
from .lines import release_line_for
from .support import transformers_version


def ep_from_pretrained_kwargs(model_ref, ep_size: int, *, layout=None, model_class=None) -> dict:
    """`from_pretrained` keyword arguments for an EP load of size `ep_size` on the installed release.

    Args:
        model_ref: the checkpoint path / hub id or its config (needed on 5.23+ for the replicate TP plan).
        ep_size: number of ranks the experts are split over.
        layout: a `DPxEPLayout` when the world holds several data-parallel replicas (world > ep_size).
        model_class: the class you will call `from_pretrained` on (default `AutoModelForCausalLM`).
    """
    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 2:
        raise EPRequestError(f"ep_size must be an int >= 2 (EP splits experts over several ranks), got {ep_size!r}")
    if layout is not None and layout.ep_size != ep_size:
        raise EPRequestError(f"layout has ep_size={layout.ep_size}, but ep_size={ep_size} was asked for")
    world = world_size()
    if layout is None and world is not None and world != ep_size:
        raise EPRequestError(
            f"ep_size={ep_size} differs from the world size ({world}): build a DPxEPLayout(ep_size) on every rank "
            "and pass layout=... (or use layout.from_pretrained_kwargs) so each data-parallel replica loads its own "
            "EP group."
        )
    line = release_line_for(transformers_version())
    # world > ep on releases that build their own world-sized mesh: loading/replica_mesh.py sizes it inside the
    # block (ranks [d*ep, (d+1)*ep) form replica d, the DPxEPLayout convention); other releases are refused there.
    return line.spelling.build(ep_size, model_ref=model_ref, model_class=model_class,
                               ep_mesh=layout.ep_mesh if layout is not None else None)
