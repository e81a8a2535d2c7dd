"""The fixed tiny MoE checkpoints of the demo, the tests, the examples and the benchmarks: a hand-written config per
family (`tiny_config_kwargs`, the same since 0.1), built by the one builder (`checkpoint.build_checkpoint`)."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoConfig

from .checkpoint import build_checkpoint, build_tiny_model
from .knobs import SIZES

# Per-model-type config keys. Only the expert count/size keys differ between MoE families; everything else is shared.
_FAMILY_KEYS = {
    "gpt_oss": {"experts": "num_local_experts", "expert_size": "intermediate_size"},
    "qwen3_moe": {"experts": "num_experts", "expert_size": "moe_intermediate_size"},
    "qwen2_moe": {"experts": "num_experts", "expert_size": "moe_intermediate_size"},
    "mixtral": {"experts": "num_local_experts", "expert_size": "intermediate_size"},
    "olmoe": {"experts": "num_experts", "expert_size": "intermediate_size"},
    "deepseek_v3": {"experts": "n_routed_experts", "expert_size": "moe_intermediate_size"},
    "llama4_text": {"experts": "num_local_experts", "expert_size": "intermediate_size"},
}

MODEL_TYPES = tuple(_FAMILY_KEYS)
"""The families with a fixed preset (`build_tiny_moe`); `build_tiny_model` builds any family with an EP plan."""


def build_tiny_moe(path: str | os.PathLike, model_type: str = "qwen3_moe", *, seed: int = 0, **sizes) -> Path:
    """Build (once) and save the fixed tiny MoE checkpoint of one of `MODEL_TYPES` at `path`; return the path.

    `sizes`: `tiny_config_kwargs`'s. Rebuilt when the transformers release, family, seed or sizes differ from what
    `path` holds, so a cache directory can be shared across releases safely."""
    config = AutoConfig.for_model(model_type, **tiny_config_kwargs(model_type, **sizes))
    return build_checkpoint(path, model_type, config, seed=seed, sizes=sizes)


def build_tiny_checkpoint(path: str | os.PathLike, model_type: str, *, seed: int = 0) -> Path:
    """The project's tiny checkpoint of `model_type` (the matrix's): the fixed preset where the family has one,
    else the family's default config shrunk (`build_tiny_model`)."""
    if model_type in MODEL_TYPES:
        return build_tiny_moe(path, model_type, seed=seed)
    return build_tiny_model(path, model_type, seed=seed)


def tiny_config_kwargs(
    model_type: str,
    *,
    num_experts: int = SIZES["num_experts"],
    hidden_size: int = SIZES["hidden_size"],
    num_layers: int = SIZES["num_layers"],
    expert_size: int = SIZES["expert_size"],
    vocab_size: int = SIZES["vocab_size"],
    top_k: int = SIZES["top_k"],
) -> dict:
    """Keyword arguments for `AutoConfig.for_model(model_type, **kwargs)` describing the tiny MoE `build_tiny_moe`
    builds with these sizes."""
    if model_type not in _FAMILY_KEYS:
        raise ValueError(f"unknown MoE family {model_type!r}; known: {', '.join(MODEL_TYPES)} (for any model type "
                         "with an EP plan, use ep_ds_shim.testing.tiny_models.build_tiny_model)")
    keys = _FAMILY_KEYS[model_type]
    heads = 4
    kwargs = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads if model_type == "deepseek_v3" else 2,
        head_dim=hidden_size // heads,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        num_experts_per_tok=top_k,
        tie_word_embeddings=False,
        # A wide init makes routing and every expert matter for the logits, so a wrong expert shard shows up
        # as a large difference instead of hiding under float noise.
        initializer_range=0.2,
        use_cache=False,
    )
    kwargs[keys["experts"]] = num_experts
    kwargs[keys["expert_size"]] = expert_size
    if model_type == "gpt_oss":
        kwargs.update(sliding_window=16, layer_types=["sliding_attention", "full_attention"][:num_layers] * 1)
    if model_type in ("qwen3_moe", "qwen2_moe"):
        kwargs.update(decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    if model_type == "qwen2_moe":
        kwargs.update(shared_expert_intermediate_size=expert_size)
    if model_type == "deepseek_v3":
        kwargs.update(
            n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1, q_lora_rank=None,
            kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, intermediate_size=expert_size,
            head_dim=4,  # deepseek_v3's rotary size is qk_rope_head_dim
        )
    if model_type == "llama4_text":
        kwargs.update(intermediate_size_mlp=expert_size, interleave_moe_layer_step=1, attention_chunk_size=16,
                      no_rope_layers=[1] * num_layers)
    return kwargs
