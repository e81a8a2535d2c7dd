"""The tiny checkpoint: built once per stamp under a file lock, seeded, saved by the installed release and checked to
reload identically."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedConfig
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from ...experts import expert_parameters, local_tensor
from .families import model_class_for
from .hub_layout import check_dims_patterns, to_hub_layout
from .knobs import SIZES
from .shrink import routing_of, tiny_config


def build_tiny_model(path: str | os.PathLike, model_type: str, *, seed: int = 0, base: PreTrainedConfig | None = None,
                     **sizes) -> Path:
    """Build (once) and save a tiny random checkpoint of `model_type` at `path`; return the path.

    `sizes` are `tiny_config`'s (defaults: `SIZES`); `base` shrinks a given config instead of the family's default.
    """
    return build_checkpoint(path, model_type, tiny_config(model_type, base=base, **sizes), seed=seed, sizes=sizes)


def build_checkpoint(path: str | os.PathLike, model_type: str, config: PreTrainedConfig, *, seed: int = 0,
                     sizes: dict | None = None) -> Path:
    """The one tiny-checkpoint builder: a random model of `config` (seeded, `redraw`) saved at `path` by the installed
    release; return the path. `build_tiny_model` (a shrunk config) and the fixed presets (`presets`) are calls on it.

    Rebuilt when the transformers release, type, seed, `sizes` (the caller's size arguments) or the config itself
    differ from the stamp in `path` (`built_once`). After saving, a single-process `from_pretrained` must reload it
    identically, else it raises.
    """
    # The config's own digest too: a change of the shrinking rules (or of the release's defaults) rebuilds.
    digest = hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()
    stamp = {"transformers": transformers.__version__, "model_type": model_type, "seed": seed, "config": digest[:16],
             **(sizes or {})}
    return built_once(path, stamp, lambda: _build(Path(path), model_type, seed, config))


def build_shrunk_model(path: str | os.PathLike, base: PreTrainedConfig, *, num_experts: int, seed: int = 0) -> Path:
    """`build_tiny_model` for a given architecture (`base`, e.g. a user's own config): the same model type, expert
    routing and options, shrunk. It keeps the experts per token (up to the tiny expert count, which grows in steps
    of `num_experts` / 2 to hold them)."""
    top_k = routing_of(base).get("top_k", SIZES["top_k"])
    step = max(1, num_experts // 2)
    while num_experts < top_k:
        num_experts += step
    return build_tiny_model(path, base.model_type, seed=seed, base=base, num_experts=num_experts, top_k=top_k)


def built_once(path: str | os.PathLike, stamp: dict, build) -> Path:
    """Run `build()` unless `path` already holds a checkpoint with this `stamp`. Every rank of a launcher may call
    this at once: a file lock lets the first build while the others wait and reuse it."""
    path = Path(path)
    stamp_file = path / "ep_ds_shim_stamp.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
            return path
        if stamp_file.exists():
            stamp_file.unlink()
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            raise RuntimeError(
                f"building {path} on rank {torch.distributed.get_rank()}: once torch.distributed is initialised, "
                "transformers' save_pretrained writes on global rank 0 only. Build tiny checkpoints before "
                "init_process_group (every rank may call this; the first to take the lock builds)."
            )
        build()
        stamp_file.write_text(json.dumps(stamp))
    return path


def redraw(model, seed: int) -> None:
    """Some releases zero-initialise router biases or leave experts at an init that makes them near-identical; a
    seeded normal re-draw of every float parameter makes each expert (and each rank's slice) distinct. A wide spread
    (0.2) makes routing and every expert matter for the logits, so a wrong shard shows as a large difference."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if not param.is_floating_point():
                continue
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))


def expert_count(model, *, local: bool = False) -> int | None:
    """The routed-expert count of a model read from its weights: dim 0 of the first expert tensor (a DTensor's
    global shape, or with ``local=True`` this rank's shard). Robust to however the config names the count."""
    for _, param in sorted(expert_parameters(model).items()):
        if param.dim() >= 2:
            return int((local_tensor(param) if local else param).shape[0])
    return None


def _build(path: Path, model_type: str, seed: int, config) -> None:
    if is_deepspeed_zero3_enabled():
        raise RuntimeError("build the tiny checkpoint before ZeRO-3 is signalled (an HfDeepSpeedConfig is alive)")
    head = model_class_for(model_type)
    torch.manual_seed(seed)
    model = head._from_config(config, dtype=torch.float32)
    redraw(model, seed)
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.safetensors"):
        old.unlink()
    model.save_pretrained(path)
    patterns = check_dims_patterns(model)
    if patterns:
        to_hub_layout(path, patterns)
    _check_reloads(path, head, model, model_type)


def _check_reloads(path: Path, head, model, model_type: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = head.from_pretrained(path, dtype=torch.float32)
    mine, theirs = model.state_dict(), reloaded.state_dict()
    bad = sorted(k for k in mine if k not in theirs or mine[k].shape != theirs[k].shape
                 or not torch.equal(mine[k], theirs[k]))
    missing = sorted(set(theirs) - set(mine))
    if bad or missing:
        raise RuntimeError(f"{model_type}: the saved checkpoint does not reload identically: differs {bad[:5]}, "
                           f"unexpected {missing[:5]}")
