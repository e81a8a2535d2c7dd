"""EP + DeepSpeed ZeRO-3 through `accelerate launch` and `Accelerator.prepare`.

    accelerate launch --config_file examples/launchers/accelerate_zero3.yaml examples/launchers/train_accelerate.py
    (GPUs: a config without use_cpu, and --device cuda)

`Accelerator()` signals ZeRO-3 (it creates the HfDeepSpeedConfig). `prepare()` calls `deepspeed.initialize`
itself, so it runs inside `ep_ds_shim.supply_deepspeed_groups(layout)`, which makes that call the library's
hand-over. Every rank trains on its own batch (`layout.sampler(...)` shards a dataset over every rank; on CPU
accelerate counts one DeepSpeed process, so this script does not give it the DataLoader to shard).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import finish, parse_args, reference_and_checkpoint  # noqa: E402


def main(argv=None) -> int:
    args = parse_args(argv)
    path, batches, ref = reference_and_checkpoint(args)  # before Accelerator(): a plain single-process model

    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    import ep_ds_shim
    from ep_ds_shim import testing

    import torch.distributed as dist

    def load():
        with ep_ds_shim.ep_zero3_compat():
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **layout.from_pretrained_kwargs(path))

    if args.load_first:  # load before Accelerator() signals ZeRO-3: supply_deepspeed_groups makes it DeepSpeed-ready
        dist.init_process_group("gloo" if args.device == "cpu" else "nccl")
        layout = ep_ds_shim.DPxEPLayout(args.ep_size or dist.get_world_size())
        model = load()
    accelerator = Accelerator()
    assert is_deepspeed_zero3_enabled(), "the accelerate config must select DeepSpeed ZeRO-3"
    if not args.load_first:
        # (accelerate reports num_processes=1 for DeepSpeed on CPU; the process group knows the real world size)
        layout = ep_ds_shim.DPxEPLayout(args.ep_size or dist.get_world_size())
        model = load()
    optimizer = torch.optim.AdamW(model.parameters(), **testing.OPTIMIZER)
    # No DataLoader goes through prepare(), so tell DeepSpeed the per-rank micro batch (accelerate's documented way),
    # and the global batch over every rank (accelerate counts num_processes=1 for DeepSpeed on CPU).
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    ds_config["train_micro_batch_size_per_gpu"] = batches[0].shape[0]
    ds_config["train_batch_size"] = batches[0].shape[0] * ds_config.get("gradient_accumulation_steps", 1) \
        * dist.get_world_size()
    with ep_ds_shim.supply_deepspeed_groups(layout):
        model, optimizer = accelerator.prepare(model, optimizer)

    model.train()
    batch = batches[layout.rank]
    out = model(input_ids=batch, labels=batch)
    accelerator.backward(out.loss)  # under DeepSpeed this also runs engine.step()
    optimizer.step()
    optimizer.zero_grad()
    return finish(args, layout, model, ref, out, launcher="accelerate")


if __name__ == "__main__":
    sys.exit(main())
