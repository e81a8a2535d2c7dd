"""The fixed tiny MoE checkpoints of the demo, the tests, the examples and the benchmarks: thin calls on the one
builder (`build_tiny_model`), for the families the project's own runs use."""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import build_tiny_model
from .shrink import tiny_config

MODEL_TYPES = ("gpt_oss", "qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "llama4_text")
"""The families the demo, the tests, the examples and the benchmarks build (`build_tiny_model` builds any family with
an EP plan)."""

# Keys of a config dict that describe where it came from, not the model: not keyword arguments of a config class.
_NOT_KWARGS = ("model_type", "transformers_version", "architectures", "_name_or_path")


def build_tiny_moe(path: str | os.PathLike, model_type: str = "qwen3_moe", *, seed: int = 0, **sizes) -> Path:
    """Build (once) and save a tiny random MoE checkpoint of one of `MODEL_TYPES` at `path`; return the path.

    `sizes`: num_experts, top_k, hidden_size, num_layers, expert_size, vocab_size (defaults: `SIZES`). Rebuilt when
    the transformers release, family, seed or sizes differ from what `path` holds, so a cache directory can be
    shared across releases safely."""
    _check_family(model_type)
    return build_tiny_model(path, model_type, seed=seed, **sizes)


def tiny_config_kwargs(model_type: str, **sizes) -> dict:
    """Keyword arguments for `AutoConfig.for_model(model_type, **kwargs)` describing the tiny MoE `build_tiny_moe`
    builds with these `sizes`."""
    _check_family(model_type)
    config = tiny_config(model_type, **sizes).to_dict()
    return {key: value for key, value in config.items() if key not in _NOT_KWARGS}


def _check_family(model_type: str) -> None:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown MoE family {model_type!r}; known: {', '.join(MODEL_TYPES)} (for any model type "
                         "with an EP plan, use ep_ds_shim.testing.tiny_models.build_tiny_model)")
