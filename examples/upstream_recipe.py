# The workflow of upstream transformers PR #45548 (docs/design.md, "The user's workflow"), kept unmodified: no ep_ds_shim import.
# Run it as is to see the released failure, or with zero edits through the shim:
#   torchrun --nproc_per_node 2 -m ep_ds_shim.run examples/upstream_recipe.py <checkpoint>
import sys

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig
from transformers.integrations import HfDeepSpeedConfig

path = sys.argv[1]
ds_config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}

deepspeed.init_distributed(dist_backend="gloo")
mesh = dist.init_device_mesh("cpu", (dist.get_world_size(),))
_hf = HfDeepSpeedConfig(ds_config)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_mesh=mesh,
                                             distributed_config=DistributedConfig(enable_expert_parallel=True))
engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=ds_config)
x = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1234))
for step in range(2):
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss)
    engine.step()
    print(f"rank={dist.get_rank()} step={step} loss={loss.item():.8f}", flush=True)
