"""What the shim records about an EP model it loaded (stored on the model), and how to find it again."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import experts
from ..errors import EpShimError

RECORD_ATTR = "_ep_ds_shim"


@dataclass
class EPModelRecord:
    """Written at the end of an EP load inside `ep_zero3_compat`."""

    ep_size: int
    ep_ranks: tuple[int, ...]  # global ranks of this rank's EP group (they hold *different* experts)
    ep_mesh: object  # the device mesh transformers built for that group
    line: object  # the ReleaseLine the model was loaded with
    fingerprints: dict[str, experts.Fingerprint]  # of this rank's expert shards, as loaded
    expert_rows: dict[str, int]  # expert tensor name -> rows (experts) of the whole tensor, over all EP ranks
    deepspeed_ready: bool = False  # DTensors made local, expert weights marked, guard armed
    # Integrity checks passed so far: "deepspeed hand-over" (right after the library's deepspeed.initialize),
    # "forward" / "training forward" (the first-forward guard).
    checked: set[str] = field(default_factory=set)
    # True while the library's hand-over runs `deepspeed.initialize` on this model (DeepSpeed's groups hook checks it)
    handing_over: bool = False
    layout: object = None  # the DPxEPLayout DeepSpeed was given (set when the library hands the model over)
    zero_stage: int | None = None  # the ZeRO stage of the engine that took it
    guard_handle: object = field(default=None, repr=False)

    def ep_group(self):
        """The process group of this rank's EP group."""
        return self.ep_mesh.get_group()


def unwrap(model_or_engine):
    """The model itself: a DeepSpeedEngine keeps it as `.module`."""
    inner = getattr(model_or_engine, "module", None)
    return inner if inner is not None and RECORD_ATTR in getattr(inner, "__dict__", {}) else model_or_engine


def record_of(model_or_engine, *, required: bool = True) -> EPModelRecord | None:
    model = unwrap(model_or_engine)
    record = getattr(model, "__dict__", {}).get(RECORD_ATTR)
    if record is None and required:
        raise EpShimError(
            f"{type(model).__name__} was not loaded with expert parallelism inside ep_ds_shim.ep_zero3_compat(), so "
            "the shim recorded nothing about its expert shards. Load it inside the block with "
            "layout.from_pretrained_kwargs(path) (or ep_ds_shim.ep_from_pretrained_kwargs)."
        )
    return record
