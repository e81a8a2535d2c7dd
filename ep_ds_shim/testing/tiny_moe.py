"""Tiny, locally built Mixture-of-Experts checkpoints for the demo, the tests and the benchmarks.

Nothing here touches a model hub: a config is built from keyword arguments, the model is instantiated with
random weights (seeded) by the *installed* transformers release and saved with its own `save_pretrained`, so
the checkpoint is always in the format that release loads.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

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


def tiny_config_kwargs(
    model_type: str,
    *,
    num_experts: int = 4,
    hidden_size: int = 32,
    num_layers: int = 2,
    expert_size: int = 64,
    vocab_size: int = 128,
    top_k: int = 2,
) -> dict:
    """Keyword arguments for `AutoConfig.for_model(model_type, **kwargs)` describing a tiny MoE."""
    if model_type not in _FAMILY_KEYS:
        raise ValueError(f"unknown MoE family {model_type!r}; known: {', '.join(MODEL_TYPES)}")
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


def build_tiny_moe(path: str | os.PathLike, model_type: str = "qwen3_moe", *, seed: int = 0, **sizes) -> Path:
    """Build (once) and save a tiny random MoE checkpoint at `path`; return the path.

    The checkpoint is rebuilt when the transformers release, family or sizes differ from what `path` holds,
    so a cache directory can be shared across releases safely.
    """
    stamp = {"transformers": transformers.__version__, "model_type": model_type, "seed": seed, **sizes}
    return built_once(path, stamp, lambda: _build(Path(path), model_type, seed, sizes))


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


def _build(path: Path, model_type: str, seed: int, sizes: dict) -> None:
    if is_deepspeed_zero3_enabled():
        raise RuntimeError("build the tiny checkpoint before ZeRO-3 is signalled (an HfDeepSpeedConfig is alive)")
    config = AutoConfig.for_model(model_type, **tiny_config_kwargs(model_type, **sizes))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    redraw(model, seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
