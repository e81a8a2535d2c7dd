"""`python -m ep_ds_shim verify`: check the shim on your own machines, against a single-process model.

Run it under your launcher, on every rank (CPU with gloo, or GPUs with NCCL and ``--device cuda``: the same code):

    torchrun --nproc_per_node 2 -m ep_ds_shim verify
    torchrun --nproc_per_node 2 -m ep_ds_shim verify --model-dir /path/to/your/checkpoint
    deepspeed --num_gpus 8 --module ep_ds_shim verify --device cuda --ep-size 8

For every MoE model type the installed transformers can expert-parallelise (or the ones named with --model-type, or
your own architecture with --model-dir: its config shrunk to a few layers and small widths, the same expert routing
and options) it builds a tiny random checkpoint locally (no hub), then checks, each against a single-process model of
the same checkpoint on the same device:

  load    EP load while ZeRO-3 is signalled, inside `ep_zero3_compat`: every rank holds its own slice of every
          expert tensor, and the logits equal the single-process model's;
  step    `ep_ds_shim.initialize` + one training step, every rank on its own batch: loss, logits, gradients,
          DeepSpeed's global gradient norm and every weight after the AdamW step equal the single-process step on
          all ranks' batches together;
  export  `ep_ds_shim.save_pretrained`, reloaded in a plain single process: no missing, unexpected or mismatched
          keys, every weight equal to the single-process model after the step.

Each check ends as pass, known (a documented refusal or an upstream defect, reproduced on the spot: `known.py`) or
FAIL (the shim is wrong here). Figures are relative to the scale of the compared values (`figures.py`). Rank 0
prints one table and the line ``N pass, N known, N FAIL``; every rank exits 0 when nothing FAILed, else 1. Other
libraries' warnings and progress output are held back inside verify's own calls (`quiet.py`; --verbose shows them).
On a release newer than the verified range it runs with the opt-in: that is what it is for.
"""

from .run import main

__all__ = ["main"]
