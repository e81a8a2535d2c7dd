"""Saved expert tensors rewritten into the released hub layout where a release's loader needs it (an upstream bug)."""

from __future__ import annotations

import re
from pathlib import Path


def check_dims_patterns(model) -> list[tuple[str, int, int]]:
    """(target pattern, dim0, dim1) of every `Transpose(check_dims=True)` conversion the release applies when
    loading `model` (for qwen3_vl_moe in 5.23/5.24: the fused expert tensors)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import Transpose
    except ImportError:
        return []
    out = []
    try:
        transforms = get_model_conversion_mapping(model)
    except Exception:
        return []
    for transform in transforms or []:
        for op in getattr(transform, "operations", None) or []:
            if isinstance(op, Transpose) and getattr(op, "check_dims", False):
                targets = getattr(transform, "target_patterns", None) or []
                for target in [targets] if isinstance(targets, str) else targets:
                    out.append((target, op.dim0, op.dim1))
    return out


def to_hub_layout(path: Path, patterns) -> int:
    """Rewrite the saved tensors a `Transpose(check_dims=True)` conversion targets into the transposed (released
    hub) layout. Returns how many tensors were rewritten.

    Upstream bug (transformers 5.23/5.24, not the shim's): `Transpose(check_dims=True)` decides whether to transpose
    by comparing the loaded tensor with `model.get_parameter(...).shape`, which under EP is the DTensor's *global*
    shape while the tensor is already this rank's shard, so they never match and a checkpoint in model layout
    (what `save_pretrained` writes) is transposed wrongly -> size-mismatch RuntimeError. Released hub checkpoints
    store the transposed layout, which loads correctly both single-process and under EP, so the tiny checkpoint is
    written that way too.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    rewritten = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        changed = False
        for key, tensor in tensors.items():
            for pattern, dim0, dim1 in patterns:
                if re.search(pattern, key) and tensor.dim() > max(dim0, dim1) and tensor.shape[dim0] != tensor.shape[dim1]:
                    tensors[key] = tensor.transpose(dim0, dim1).contiguous()
                    changed = True
                    rewritten += 1
                    break
        if changed:
            save_file(tensors, str(file), metadata=metadata)
    return rewritten
