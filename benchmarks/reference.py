"""The single-process reference of the shim-vs-AutoEP comparison: the same checkpoint, the same batches, torch
AdamW with the same settings, gradient clipping 1.0 as DeepSpeed applies it; the loss of every step.

    python benchmarks/reference.py <checkpoint> <out.json> [--steps K]

Every distributed variant trains on the same global batch per step (`common.step_batch`, --sequences sequences):
split over the ranks (ep-ds-shim 0.3, AutoEP "split": the data-parallel mean of equal-sized slices is the whole
batch's gradient) or whole on every rank (ep-ds-shim 0.2's EP group, AutoEP "same"); the reference trains on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--sequences", type=int, default=common.MICRO)
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
    model.train()
    optimizer = common.adamw(model.parameters())
    losses = []
    for step in range(args.steps):
        batch = common.step_batch(step, model.config.vocab_size, args.sequences)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), common.CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    Path(args.out).write_text(json.dumps({"losses": losses, "transformers": transformers.__version__,
                                          "seconds": time.perf_counter() - started,
                                          "peak_mb": common.peak_mb()}))


if __name__ == "__main__":
    main()
