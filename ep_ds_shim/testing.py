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

# Per-family config keys. Only the expert count/size keys differ between families; everything else is shared.
_FAMILY_KEYS = {
    "gpt_oss": {"experts": "num_local_experts", "expert_size": "intermediate_size"},
    "qwen3_moe": {"experts": "num_experts", "expert_size": "moe_intermediate_size"},
    "qwen2_moe": {"experts": "num_experts", "expert_size": "moe_intermediate_size"},
    "mixtral": {"experts": "num_local_experts", "expert_size": "intermediate_size"},
    "olmoe": {"experts": "num_experts", "expert_size": "intermediate_size"},
    "deepseek_v3": {"experts": "n_routed_experts", "expert_size": "moe_intermediate_size"},
    "llama4_text": {"experts": "num_local_experts", "expert_size": "intermediate_size"},
}

FAMILIES = tuple(_FAMILY_KEYS)


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
        raise ValueError(f"unknown MoE family {model_type!r}; known: {', '.join(FAMILIES)}")
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
    import transformers

    path = Path(path)
    stamp = {"transformers": transformers.__version__, "model_type": model_type, "seed": seed, **sizes}
    stamp_file = path / "ep_ds_shim_stamp.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Every rank of a launcher may call this at once: the first builds, the others wait and reuse it.
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
            return path
        _build(path, model_type, seed, sizes)
        stamp_file.write_text(json.dumps(stamp))
    return path


def _build(path: Path, model_type: str, seed: int, sizes: dict) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise RuntimeError("build the tiny checkpoint before ZeRO-3 is signalled (an HfDeepSpeedConfig is alive)")
    config = AutoConfig.for_model(model_type, **tiny_config_kwargs(model_type, **sizes))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Some releases zero-initialise router biases or leave experts at an init that makes them near-identical;
    # a seeded normal re-draw of every float parameter makes each expert (and each rank's slice) distinct.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)


# --- The correctness oracle (DESIGN §6) -----------------------------------------------------------------
# A single-process model loaded from the same checkpoint is the reference. DeepSpeed averages gradients over
# its data-parallel group, so for dp replicas fed batches b_0..b_{dp-1} the reference loss is their mean.
# Gradient clipping (DeepSpeed's default is 1.0) and AdamW are applied exactly as DeepSpeed applies them.

OPTIMIZER = dict(lr=1e-3, eps=1e-4, weight_decay=0.01)
"""AdamW settings for parity checks. Adam's first step divides each gradient by its own magnitude, so with the
default eps=1e-8 a gradient of 1e-9 and one of 2e-9 move a weight by very different amounts: float noise in
tiny gradients would decide the result. eps=1e-4 keeps the step smooth in the gradient while still being a
real Adam step for every gradient above ~1e-4."""


def batch_for(dp_rank: int, *, vocab_size: int = 128, batch: int = 2, seq: int = 8, seed: int = 1234):
    """The batch data-parallel replica `dp_rank` trains on (every rank of its EP group gets the same one)."""
    import torch

    generator = torch.Generator().manual_seed(seed + dp_rank)
    return torch.randint(0, vocab_size, (batch, seq), generator=generator)


def reference_step(path, batches, *, clip: float = 1.0, optimizer=OPTIMIZER):
    """One training step of a single-process model on the mean loss of `batches`.

    Returns logits and loss per batch (before the step), every gradient (before clipping) and every
    parameter after one AdamW step, keyed by parameter name.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise RuntimeError("compute the reference before ZeRO-3 is signalled (HfDeepSpeedConfig alive)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    outputs = [model(input_ids=b, labels=b) for b in batches]
    loss = sum(o.loss for o in outputs) / len(outputs)
    loss.backward()
    # Gradients as DeepSpeed reports them after backward (before the step clips them).
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    grad_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])))
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    torch.optim.AdamW(model.parameters(), **optimizer).step()
    return {
        "logits": [o.logits.detach() for o in outputs],
        "loss": [o.loss.item() for o in outputs],
        "grads": grads,
        "grad_norm": grad_norm,
        "params": {name: p.detach().clone() for name, p in model.named_parameters()},
    }


def expert_slice(reference: "torch.Tensor", local_shape, ep_rank: int):
    """The part of a full expert tensor that EP rank `ep_rank` holds (experts split evenly on dim 0)."""
    rows = local_shape[0]
    if tuple(reference.shape) == tuple(local_shape):
        return reference
    return reference[ep_rank * rows : (ep_rank + 1) * rows]


def max_abs_diffs(local: dict, reference: dict, ep_rank: int) -> dict[str, float]:
    """Per-name max |local - reference| (expert tensors compared with this rank's slice)."""
    out = {}
    for name, value in local.items():
        ref = expert_slice(reference[name], value.shape, ep_rank)
        out[name] = float((value.float() - ref.float()).abs().max()) if value.numel() else 0.0
    return out


def compare_step(engine, layout, ref, *, logits, loss, grads=None, tolerance: float = 1e-5) -> dict:
    """Compare one DeepSpeed step of this rank with the single-process `ref` (from `reference_step`).

    Call after `engine.step()`: reads every weight (DeepSpeed's fp32 master copy) and the global gradient norm
    DeepSpeed computed for clipping. `grads`, if given, are this rank's full gradients read before the step.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    params = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}
    result = {
        "loss": abs(float(loss) - ref["loss"][layout.dp_rank]),
        "logits": float((logits.detach().float() - ref["logits"][layout.dp_rank]).abs().max()),
        "params": max(max_abs_diffs(params, ref["params"], layout.ep_rank).values()),
    }
    norm = engine.get_global_grad_norm()
    if norm is not None:
        result["grad_norm"] = abs(float(norm) - ref["grad_norm"])
    if grads is not None:
        result["grads"] = max(max_abs_diffs(grads, ref["grads"], layout.ep_rank).values())
    result["ok"] = all(value <= tolerance * (1 if key != "grad_norm" else max(1.0, ref["grad_norm"]))
                       for key, value in result.items())
    return result
