"""What the example scripts share: arguments, the tiny checkpoint, the single-process oracle, the report.

Not part of the library: the examples are the recipes, this file only keeps them short.
"""

from __future__ import annotations

import argparse
import json
import os


def parse_args(argv=None, description: str = ""):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-dir", help="checkpoint directory (default: build a tiny MoE under build/examples)")
    parser.add_argument("--family", default="qwen3_moe", help="MoE family of the tiny checkpoint")
    parser.add_argument("--ep-size", type=int, default=None, help="expert-parallel size (default: world size)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--no-reference", action="store_true", help="skip the single-process comparison")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--json", help="write this rank's results to JSON (path may contain {rank})")
    parser.add_argument("--load-first", action="store_true",
                        help="load the model before DeepSpeed is signalled (Trainer / Accelerator created afterwards)")
    # the `deepspeed` launcher passes --local_rank (LOCAL_RANK is in the environment as well)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", args.device)
    return args


def reference_and_checkpoint(args):
    """The checkpoint path, every rank's batch, and the single-process reference step (all batches together).

    Runs before ZeRO-3 is signalled, so the reference is a plain model. Every rank computes it (no collective).
    """
    from ep_ds_shim import testing

    path = args.model_dir or testing.build_tiny_moe(os.path.join("build", "examples", f"tiny-{args.family}"), args.family)
    with open(os.path.join(path, "config.json")) as handle:
        vocab_size = json.load(handle)["vocab_size"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batches = [testing.batch_for(rank, vocab_size=vocab_size) for rank in range(world)]
    reference = None if args.no_reference else testing.reference_step(path, batches)
    return str(path), batches, reference


def finish(args, layout, engine, reference, out, *, launcher: str, grads=None) -> int:
    """Print (and optionally write) this rank's comparison with the reference; 0 when it matches."""
    import torch.distributed as dist

    from ep_ds_shim import testing
    from ep_ds_shim.experts import expert_parameters

    expert_shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in expert_parameters(engine.module).items()}
    first = next(iter(expert_shapes))
    rank = dist.get_rank()
    print(f"[rank {rank}] {launcher}: {layout}: {len(expert_shapes)} expert tensors, e.g. {first} {expert_shapes[first]}")
    results = {"rank": rank, "launcher": launcher, "layout": repr(layout), "loss_value": out.loss.item(),
               "expert_shapes": expert_shapes, **held_fractions(engine.module)}
    print(f"[rank {rank}] ZeRO-3 holds here {results['dense_held']:.3f} of the dense weights and "
          f"{results['expert_held']:.3f} of its expert shards (world {dist.get_world_size()})")
    if reference is not None:
        results.update(testing.compare_step(engine, layout, reference, logits=out.logits, loss=out.loss, grads=grads,
                                            tolerance=args.tolerance))
        parts = [f"max|dlogits|={results['logits']:.2e}", f"|dloss|={results['loss']:.2e}"]
        if "grads" in results:
            parts.append(f"max|dgrad|={results['grads']:.2e}")
        if "grad_norm" in results:
            parts.append(f"|dgrad_norm|={results['grad_norm']:.2e}")
        parts.append(f"max|dparam after AdamW step|={results['params']:.2e}")
        print(f"[rank {rank}] vs single-process reference: {' '.join(parts)} -> {'MATCH' if results['ok'] else 'MISMATCH'}")
    if args.json:
        with open(args.json.format(rank=rank), "w") as handle:
            json.dump(results, handle, indent=1, default=str)
    dist.barrier()
    return 0 if results.get("ok", True) else 1


def held_fractions(model) -> dict:
    """How much of the dense weights, and of this rank's expert shards, ZeRO-3 keeps on this rank (its partitions:
    `ds_tensor` over `ds_numel`); the optimizer state and gradients are partitioned the same way."""
    from ep_ds_shim.experts import is_expert_parameter_name

    held = {"dense": [0, 0], "expert": [0, 0]}
    for name, param in model.named_parameters():
        if hasattr(param, "ds_tensor"):
            kind = held["expert" if is_expert_parameter_name(name) else "dense"]
            kind[0] += param.ds_tensor.numel()
            kind[1] += param.ds_numel
    return {f"{kind}_held": part / total if total else 1.0 for kind, (part, total) in held.items()}
