"""The correctness oracle: a single-process model loaded from the same checkpoint (docs/design.md, "The oracle").

Every rank trains on its own batch and DeepSpeed averages gradients over all ranks, so for ranks fed batches
b_0..b_{world-1} the reference is one model on all of them together (their mean loss: equal token counts).
Gradient clipping (DeepSpeed's default is 1.0) and AdamW are applied exactly as DeepSpeed applies them.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

# How close a DeepSpeed bf16 run must be to the single-process DeepSpeed bf16 run of the same steps (README,
# "Saving, resuming, exporting"). bf16 keeps 8 significant bits: with data parallelism DeepSpeed averages the
# replicas' bf16 gradients where the single process computes one bf16 gradient of their batches together, so the two
# round differently and drift apart slowly, as any two bf16 runs do. Measured on the tiny models over 20 steps:
# dp=1 identical; dp=2 x ep=2 at most 0.038 on the loss and 0.008 on the weights. A wrong expert shard moves the
# loss by 0.3-1 from the first step.
BF16_LOSS_TOLERANCE = 5e-2
BF16_PARAM_TOLERANCE = 2e-2

OPTIMIZER = dict(lr=1e-3, eps=1e-4, weight_decay=0.01)
"""AdamW settings for parity checks. Adam's first step divides each gradient by its own magnitude, so with the
default eps=1e-8 a gradient of 1e-9 and one of 2e-9 move a weight by very different amounts: float noise in
tiny gradients would decide the result. eps=1e-4 keeps the step smooth in the gradient while still being a
real Adam step for every gradient above ~1e-4."""


def param_tolerance(tolerance: float, optimizer: dict = OPTIMIZER) -> float:
    """How far a weight may be from the reference after one Adam step when the gradients agree within `tolerance`.

    Adam's first update is lr * g / (|g| + eps), whose slope in g is at most lr / eps: a gradient difference of d can
    move a weight by up to (lr / eps) * d (10x with OPTIMIZER). A wrong or missing update moves it by about lr, far
    above this bound, so the check still catches every real error. Tiny models of the larger families reach gradient
    differences of ~1e-6 (float summation order), hence weight differences of ~1e-5."""
    return tolerance * (1 + optimizer["lr"] / optimizer["eps"])


def batch_for(rank: int, *, vocab_size: int = 128, batch: int = 2, seq: int = 8, seed: int = 1234):
    """The batch rank `rank` trains on."""
    generator = torch.Generator().manual_seed(seed + rank)
    return torch.randint(0, vocab_size, (batch, seq), generator=generator)


def reference_step(path, batches, *, clip: float = 1.0, optimizer=OPTIMIZER, model_class=None, device=None):
    """One training step of a single-process model on the mean loss of `batches` (input_ids tensors, or dicts of
    forward arguments with labels), on `device` (default CPU) with `model_class` (default AutoModelForCausalLM).

    Returns the parameters before the step, logits and loss per batch (before the step), every gradient (before
    clipping) and every parameter after one AdamW step, keyed by parameter name.
    """
    if is_deepspeed_zero3_enabled():
        raise RuntimeError("compute the reference before ZeRO-3 is signalled (HfDeepSpeedConfig alive)")
    model = (model_class or AutoModelForCausalLM).from_pretrained(path, dtype=torch.float32).to(device or "cpu")
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.train()
    inputs = [b if isinstance(b, dict) else {"input_ids": b, "labels": b} for b in batches]
    outputs = [model(**b) for b in inputs]
    loss = sum(o.loss for o in outputs) / len(outputs)
    loss.backward()
    # Gradients as DeepSpeed reports them after backward (before the step clips them); a weight the forward did not
    # use (a vision tower on a text batch, say) has none: zero, as DeepSpeed reports it.
    grads = {name: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
             for name, p in model.named_parameters()}
    grad_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])))
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    torch.optim.AdamW(model.parameters(), **optimizer).step()
    return {
        "initial": initial,
        "logits": [o.logits.detach() for o in outputs],
        "loss": [o.loss.item() for o in outputs],
        "grads": grads,
        "grad_norm": grad_norm,
        "params": {name: p.detach().clone() for name, p in model.named_parameters()},
    }


def expert_slice(reference: torch.Tensor, local_shape, ep_rank: int):
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


def full_fp32(param):
    """This rank's full fp32 value of a parameter under DeepSpeed: the ZeRO master copy, or (stage 0, no
    mixed-precision optimizer) the parameter itself."""
    from deepspeed.utils import safe_get_full_fp32_param  # DeepSpeed is only needed once an engine exists

    shape = getattr(param, "ds_shape", param.shape)
    if not shape.numel():  # an empty weight: ZeRO-3 keeps no optimizer slot for it, and there is nothing to compare
        return torch.zeros(shape, dtype=torch.float32)
    full = safe_get_full_fp32_param(param)
    return full if full is not None else param


def full_grads(engine) -> dict[str, torch.Tensor]:
    """This rank's full gradient of every weight, read after `engine.backward` and before `engine.step` (what
    `compare_step` takes as `grads`): zero for a weight the forward did not use, as `reference_step` reports it."""
    from deepspeed.utils import safe_get_full_grad  # DeepSpeed is only needed once an engine exists

    grads = {}
    for name, param in engine.module.named_parameters():
        shape = getattr(param, "ds_shape", param.shape)
        grad = safe_get_full_grad(param) if shape.numel() else None  # an empty weight has no ZeRO-3 gradient slot
        grads[name] = grad.detach().clone() if grad is not None else torch.zeros(shape, dtype=param.dtype)
    return grads


def compare_step(engine, layout, ref, *, logits, loss, grads=None, tolerance: float = 1e-5,
                 weights_tolerance: float | None = None) -> dict:
    """Compare one DeepSpeed step of this rank with the single-process `ref` (from `reference_step`).

    Call after `engine.step()`: reads every weight (DeepSpeed's fp32 master copy) and the global gradient norm
    DeepSpeed computed for clipping. `grads`, if given, are this rank's full gradients read before the step. The
    loss and logits are this rank's, compared with the reference's on this rank's batch (`ref` holds one per rank).
    The weights are held to `weights_tolerance` (default: `tolerance`; `param_tolerance` gives Adam's bound).
    """
    params = {n: full_fp32(p).detach().clone() for n, p in engine.module.named_parameters()}
    result = {
        "loss": abs(loss.item() - ref["loss"][layout.rank]),
        "logits": float((logits.detach().float() - ref["logits"][layout.rank]).abs().max()),
        "params": max(max_abs_diffs(params, ref["params"], layout.ep_rank).values()),
    }
    norm = engine.get_global_grad_norm()
    if norm is not None:
        result["grad_norm"] = abs(float(norm) - ref["grad_norm"])
    if grads is not None:
        result["grads"] = max(max_abs_diffs(grads, ref["grads"], layout.ep_rank).values())
    limits = {"grad_norm": tolerance * max(1.0, ref["grad_norm"]), "params": weights_tolerance or tolerance}
    result["ok"] = all(value <= limits.get(key, tolerance) for key, value in result.items())
    return result


# --- A real training run: several steps, gradient accumulation, clipping, a learning-rate schedule ----------------


def schedule(total_steps: int, warmup: int = 2):
    """The learning-rate multiplier both sides use: linear warm-up, then linear decay to 10%."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.1, 1.0 - 0.9 * (step - warmup) / max(1, total_steps - warmup))

    return multiplier


def run_batch(step: int, micro: int, rank: int, *, grad_accum: int, world: int, vocab_size: int = 128,
              batch: int = 2, seq: int = 8):
    """The micro-batch rank `rank` trains on at (step, micro): distinct for every step, micro-step and rank."""
    return batch_for(((step * grad_accum) + micro) * world + rank, vocab_size=vocab_size, batch=batch, seq=seq,
                     seed=4321)


def reference_run(path, *, steps: int, grad_accum: int, world, clip: float = 1.0, optimizer=OPTIMIZER,
                  vocab_size: int = 128) -> dict:
    """`steps` optimizer steps of a single-process fp32 model, doing what DeepSpeed does over `world` ranks with
    gradient accumulation: per micro-step every rank's batch together (their mean loss, equal token counts),
    scaled by 1/grad_accum; then clipping, AdamW and the schedule. `world` may also list the ranks of every step (a
    run resumed on another layout). Returns the loss of every step (mean over its micro-steps and ranks), the global
    gradient norm of every step (before clipping) and the parameters after the last one."""
    worlds = [world] * steps if isinstance(world, int) else [int(ranks) for ranks in world]
    if is_deepspeed_zero3_enabled():
        raise RuntimeError("compute the reference before ZeRO-3 is signalled (HfDeepSpeedConfig alive)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    adamw = torch.optim.AdamW(model.parameters(), **optimizer)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(adamw, schedule(steps))
    losses, grad_norms = [], []
    for step in range(steps):
        step_loss = 0.0
        for micro in range(grad_accum):
            batch = torch.cat([run_batch(step, micro, r, grad_accum=grad_accum, world=worlds[step],
                                         vocab_size=vocab_size) for r in range(worlds[step])])
            loss = model(input_ids=batch, labels=batch).loss
            (loss / grad_accum).backward()
            step_loss += loss.item() / grad_accum
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
        grad_norms.append(float(norm))
        adamw.step()
        lr_schedule.step()
        adamw.zero_grad()
        losses.append(step_loss)
    return {"losses": losses, "grad_norms": grad_norms,
            "params": {name: p.detach().clone() for name, p in model.named_parameters()}}
