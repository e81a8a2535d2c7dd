"""Expert parallelism under DeepSpeed ZeRO-3, end to end: load -> deepspeed.initialize -> one training step.

    torchrun --nproc_per_node 2 examples/train_ep_zero3.py                 # CPU, ep=2, dp=1
    torchrun --nproc_per_node 4 examples/train_ep_zero3.py --ep-size 2     # CPU, dp=2 x ep=2
    torchrun --nproc_per_node 8 examples/train_ep_zero3.py --device cuda --ep-size 8 --model-dir <ckpt>

With no --model-dir it builds a tiny random MoE checkpoint under build/ (no hub access). Every rank then prints
its expert shapes and compares logits, loss, gradients and the weights after one AdamW step with a
single-process model loaded from the same checkpoint (--no-reference to skip, e.g. for a real model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="checkpoint directory (default: build a tiny MoE under build/)")
    parser.add_argument("--family", default="qwen3_moe", help="MoE family of the tiny checkpoint")
    parser.add_argument("--ep-size", type=int, default=None, help="expert-parallel size (default: world size)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--no-reference", action="store_true", help="skip the single-process comparison")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--json", help="write this rank's results to JSON (path may contain {rank})")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", args.device)
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    import ep_ds_shim
    from ep_ds_shim import testing

    deepspeed.init_distributed(dist_backend="nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))

    path = args.model_dir
    if path is None:
        path = os.path.join("build", "examples", f"tiny-{args.family}")
        if rank == 0:
            testing.build_tiny_moe(path, args.family)
        dist.barrier()

    # 1. The DP x EP layout: every rank of an EP group sees the same batch; DeepSpeed's groups follow it.
    layout = ep_ds_shim.DPxEPLayout(args.ep_size or world)
    # The oracle: a single-process model from the same checkpoint, one step on every replica's batch.
    # Computed before ZeRO-3 is signalled, so it is a plain model.
    vocab_size = json.load(open(os.path.join(path, "config.json")))["vocab_size"]
    batches = [testing.batch_for(d, vocab_size=vocab_size) for d in range(layout.dp_size)]
    ref = None if args.no_reference else testing.reference_step(path, batches)

    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "steps_per_print": 10**9,
    }
    hf_ds_config = HfDeepSpeedConfig(ds_config)  # ZeRO-3 signalled, as under accelerate launch / Trainer

    # 2. The EP load, inside the block: each rank keeps its own experts.
    with ep_ds_shim.ep_zero3_compat():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **layout.from_pretrained_kwargs(path))
    model.train()
    expert_shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if "experts" in n.split(".")}
    first = next(iter(expert_shapes))
    print(f"[rank {rank}] {layout}: {len(expert_shapes)} expert tensors, e.g. {first} {expert_shapes[first]}")

    # 3. DeepSpeed with the DP x EP groups (ep_ds_shim.initialize = deepspeed.initialize(..., mpu=layout.mpu())
    #    followed by the expert integrity check).
    optimizer = torch.optim.AdamW(model.parameters(), **testing.OPTIMIZER)
    engine, optimizer, _, _ = ep_ds_shim.initialize(model=model, layout=layout, optimizer=optimizer, config=ds_config)

    # 4. One step. The batch depends only on the data-parallel rank.
    batch = batches[layout.dp_rank]
    out = engine(input_ids=batch, labels=batch)
    engine.backward(out.loss)
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()}
    engine.step()
    params = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}
    results = {"rank": rank, "layout": repr(layout), "loss": out.loss.item(), "expert_shapes": expert_shapes}

    if ref is not None:
        logits = out.logits.detach().float()
        results.update(
            reference_loss=ref["loss"][layout.dp_rank],
            logits=float((logits - ref["logits"][layout.dp_rank]).abs().max()),
            loss=abs(out.loss.item() - ref["loss"][layout.dp_rank]),
            grads=max(testing.max_abs_diffs(grads, ref["grads"], layout.ep_rank).values()),
            params=max(testing.max_abs_diffs(params, ref["params"], layout.ep_rank).values()),
        )
        worst = max(results[k] for k in ("logits", "loss", "grads", "params"))
        results["ok"] = worst <= args.tolerance
        print(
            f"[rank {rank}] vs single-process reference: max|dlogits|={results['logits']:.2e} "
            f"|dloss|={results['loss']:.2e} max|dgrad|={results['grads']:.2e} "
            f"max|dparam after AdamW step|={results['params']:.2e} -> {'MATCH' if results['ok'] else 'MISMATCH'}"
        )
    if args.json:
        with open(args.json.format(rank=rank), "w") as handle:
            json.dump(results, handle, indent=1, default=str)
    dist.barrier()
    ok = results.get("ok", True)
    del hf_ds_config
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
