"""Expert parallelism under DeepSpeed ZeRO-3, end to end: load -> deepspeed.initialize -> one training step.

    torchrun --nproc_per_node 2 examples/train_ep_zero3.py                 # CPU, ep=2, dp=1
    torchrun --nproc_per_node 4 examples/train_ep_zero3.py --ep-size 2     # CPU, dp=2 x ep=2
    deepspeed --num_gpus 8 examples/train_ep_zero3.py --device cuda --ep-size 8 --model-dir <ckpt>

With no --model-dir it builds a tiny random MoE checkpoint under build/examples (no hub access). Every rank trains
on its own batch, prints its expert shapes and compares logits, loss, gradients, DeepSpeed's global gradient norm
and the weights after one AdamW step with a single-process model from the same checkpoint that trains on every
rank's batch at once (--no-reference to skip).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import finish, parse_args, reference_and_checkpoint  # noqa: E402


def main(argv=None) -> int:
    args = parse_args(argv, __doc__)
    path, batches, ref = reference_and_checkpoint(args)  # before ZeRO-3 is signalled: a plain model

    import deepspeed
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    import ep_ds_shim
    from ep_ds_shim import testing

    deepspeed.init_distributed(dist_backend="nccl" if args.device == "cuda" else "gloo")
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))

    # 1. The DP x EP layout: EP groups of consecutive ranks split the experts; every rank trains on its own batch.
    layout = ep_ds_shim.DPxEPLayout(args.ep_size or dist.get_world_size())
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,  # explicit: DeepSpeed's default changed within 0.19.x; the oracle clips at 1.0
        "zero_optimization": {"stage": 3},
        "steps_per_print": 10**9,
    }
    hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841 - ZeRO-3 signalled, as under accelerate / Trainer

    # 2. The EP load, inside the block: each rank keeps its own experts.
    with ep_ds_shim.ep_zero3_compat():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **layout.from_pretrained_kwargs(path))
    model.train()

    # 3. DeepSpeed through the library: ZeRO-3 partitions the dense weights over every rank and each expert shard
    #    over the ranks holding the same experts (DeepSpeed's own expert groups); the expert shards are checked.
    optimizer = torch.optim.AdamW(model.parameters(), **testing.OPTIMIZER)
    engine, optimizer, _, _ = ep_ds_shim.initialize(model=model, layout=layout, optimizer=optimizer, config=ds_config)

    # 4. One step, each rank on its own batch.
    batch = batches[layout.rank]
    out = engine(input_ids=batch, labels=batch)
    engine.backward(out.loss)
    grads = None
    if ref is not None:
        from ep_ds_shim.testing import full_grads

        grads = full_grads(engine)
    engine.step()
    return finish(args, layout, engine, ref, out, launcher="deepspeed.initialize", grads=grads)


if __name__ == "__main__":
    sys.exit(main())
