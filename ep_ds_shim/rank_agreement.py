"""Ranks that must agree, checked before they act on it: one clear error on every rank instead of a gloo abort,
an NCCL hang or silently different models.

`agree` exchanges a small summary through the process group's store with a timeout
(`ep_ds_shim.distributed.exchange`), so a rank that never gets there is named instead of hanging the others. Two
points use it: before an EP load starts (`check_load_request`, here, called by the loading block) and before
DeepSpeed takes the model (`ep_ds_shim.training.agreement`). Shared by both sides, so it depends on neither.
"""

from __future__ import annotations

from importlib import metadata

import torch
import torch.distributed as dist

from .distributed import exchange
from .errors import RankDisagreementError
from .releases.support import transformers_version
from .version import __version__


def versions() -> dict:
    try:
        deepspeed = metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        deepspeed = None
    return {"transformers": transformers_version(), "deepspeed": deepspeed, "ep-ds-shim": __version__,
            "torch": torch.__version__}


def check_load_request(model_class: str, ep_size: int, kwargs: dict) -> None:
    """Before the load's first collective: every rank asks for the same EP load."""
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype", "default"))
    summary = {"model class": model_class, "ep_size": ep_size, "dtype": str(dtype), "versions": versions()}
    agree("ep_load", summary, "the EP load (from_pretrained inside ep_zero3_compat)")


def agree(topic: str, summary: dict, what: str, *, extra: dict | None = None) -> dict[int, dict]:
    """Exchange `summary` (+ per-rank `extra`, not compared) among all ranks; raise the same error everywhere if
    any field differs."""
    summaries = exchange(topic, {**summary, **(extra or {})}, what=what)
    differences = disagreements(summary, summaries)
    if differences:
        raise RankDisagreementError(
            f"rank {dist.get_rank()}: the ranks disagree before {what}:\n  - " + "\n  - ".join(differences)
            + "\nEvery rank must run the same load and training set-up (same dtype, EP size, model, layout and "
            "library versions); nothing was run with these differences."
        )
    return summaries


def disagreements(summary: dict, summaries: dict[int, dict]) -> list[str]:
    """One line per field of `summary` on which the ranks' `summaries` differ, naming which ranks have what."""
    differences = []
    for key in summary:
        values: dict[str, list[int]] = {}
        for rank, other in sorted(summaries.items()):
            values.setdefault(repr(other.get(key)), []).append(rank)
        if len(values) > 1:
            differences.append(f"{key}: " + "; ".join(f"ranks {ranks} have {value}" for value, ranks in values.items()))
    return differences
