# quickstart.py: torchrun --nproc_per_node 2 quickstart.py      (CPU or GPUs: the same script)
import os
import warnings

import torch

device = "cuda" if torch.cuda.is_available() else "cpu"
os.environ.setdefault("DS_ACCELERATOR", device)  # before DeepSpeed is imported: it would guess, with a warning

import deepspeed  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen3MoeConfig  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402

import ep_ds_shim  # noqa: E402

# Optional: DeepSpeed 0.19's ZeRO-3 calls two torch collectives that torch 2.13 deprecates, and on CPU the
# FutureWarning repeats at every step on every rank. This hides exactly those two messages.
warnings.filterwarnings("ignore", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")

deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
rank = torch.distributed.get_rank()
if device == "cuda":
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))

# Your checkpoint goes here. To run anywhere, this script writes a tiny random MoE once (no model hub).
path = "build/quickstart/tiny-qwen3-moe"
if rank == 0 and not os.path.exists(f"{path}/config.json"):
    config = Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=4, num_experts_per_tok=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
torch.distributed.barrier()

# 1. EP layout: world = data parallel x ep_size. 2. ZeRO-3, signalled as accelerate / the Trainer signal it.
layout = ep_ds_shim.DPxEPLayout(ep_size=2)
ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
             "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}
hf_ds_config = HfDeepSpeedConfig(ds_config)  # keep it alive while loading

# 3. The EP load inside the block: each rank reads only its own experts.
with ep_ds_shim.ep_zero3_compat():
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **layout.from_pretrained_kwargs(path))

# 4. DeepSpeed through the library: dense weights partitioned over all ranks, experts over their replicas.
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
engine, *_ = ep_ds_shim.initialize(model=model, layout=layout, optimizer=optimizer, config=ds_config)

# 5. Train: every rank on its own batches (a learnable toy sequence: each token follows the previous one).
data = (torch.arange(16).repeat(64, 1) + torch.arange(64)[:, None]) % 128
loader = DataLoader(data, sampler=layout.sampler(data), batch_size=2)
for step, batch in enumerate(loader):
    batch = batch.to(engine.device)
    loss = engine(input_ids=batch, labels=batch).loss
    engine.backward(loss)
    engine.step()
    if rank == 0 and step % 4 == 0:
        print(f"step {step:2d}  loss {loss.item():.3f}", flush=True)

# 6. Resume point and a standard checkpoint (both reload in any DP x EP layout): call both on every rank.
engine.save_checkpoint("build/quickstart/checkpoint")
ep_ds_shim.save_pretrained(engine, "build/quickstart/model")
if rank == 0:
    print("saved build/quickstart/checkpoint and build/quickstart/model", flush=True)
