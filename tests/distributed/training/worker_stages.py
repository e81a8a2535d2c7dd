"""One rank of the stage x signal matrix (run by torchrun from test_stages.py).

    worker_stages.py <checkpoint> <report.json> <cell> [<cell> ...]

A cell is ``<signal>-<stage>-<path>``:
  signal  what was alive while the model loaded inside ep_zero3_compat(): "zero3" / "zero2" (an HfDeepSpeedConfig
          of that stage) or "none";
  stage   the ZeRO stage of the DeepSpeed engine (0-3);
  path    "upstream": deepspeed.initialize(model, optimizer, config) without the library (the recipe users copy);
          "layout":   ep_ds_shim.initialize(model=..., layout=..., ...).
Every rank trains on its own batch; the reference is one single-process step on all of them together.
Each cell loads the model, builds the optimizer from its parameters (as users do, before DeepSpeed sees it),
initializes, runs one step and records where it raised (and what), or how the step compares with the
single-process reference. Numbers only; the assertions live in the test.
"""

from __future__ import annotations

import gc
import os
import sys
import traceback

import torch
import torch.distributed as dist


def zero_config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
            "steps_per_print": 10**9}


def run_cell(cell: str, path: str, layout, reference) -> dict:
    import deepspeed
    from deepspeed.utils import groups
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    import ep_ds_shim
    from ep_ds_shim import testing
    from ep_ds_shim.experts import expert_parameters, local_tensor

    signal, stage, route = cell.split("-")
    stage = int(stage)
    groups.mpu = None  # DeepSpeed never clears it: each cell must start like a fresh process
    result = {"cell": cell, "stage_reached": "load", "raised": None}
    signalled = HfDeepSpeedConfig(zero_config(3 if signal == "zero3" else 2)) if signal != "none" else None
    try:
        with ep_ds_shim.ep_zero3_compat():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **layout.from_pretrained_kwargs(path))
        loaded = {n: local_tensor(p).detach().clone() for n, p in expert_parameters(model).items()}
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), **testing.OPTIMIZER)
        result["stage_reached"] = "initialize"
        if route == "upstream":
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=zero_config(stage))
        else:
            engine, *_ = ep_ds_shim.initialize(model=model, layout=layout, optimizer=optimizer,
                                                config=zero_config(stage))
        batch = testing.batch_for(layout.rank)
        result["stage_reached"] = "forward"
        out = engine(input_ids=batch, labels=batch)
        result["stage_reached"] = "backward"
        engine.backward(out.loss)
        grads = testing.full_grads(engine)
        result["stage_reached"] = "step"
        engine.step()
        result["stage_reached"] = "done"
        result.update(testing.compare_step(engine, layout, reference, logits=out.logits, loss=out.loss, grads=grads))
    except Exception as error:  # noqa: BLE001 - a refusal is a result
        result["raised"] = type(error).__name__
        result["message"] = str(error)[:1500]
        result["trace"] = traceback.format_exc()[-1500:]
        if "model" in locals():
            # did anything overwrite this rank's experts before the refusal?
            current = {n: local_tensor(p).detach() for n, p in expert_parameters(model).items()}
            result["experts_intact"] = all(
                current[n].shape == v.shape and torch.equal(current[n].float(), v.float()) for n, v in loaded.items()
                if n in current and current[n].numel())
    finally:
        del signalled
        unset_hf_deepspeed_config()
        gc.collect()
    dist.barrier()
    return result


def main(path: str, report_path: str, *cells: str) -> None:
    import deepspeed

    import ep_ds_shim
    from ep_ds_shim import testing

    deepspeed.init_distributed(dist_backend="gloo")
    layout = ep_ds_shim.DPxEPLayout(2)
    reference = testing.reference_step(path, [testing.batch_for(r) for r in range(layout.world_size)])
    report = {"rank": dist.get_rank(), "cells": {}}
    for cell in cells:
        report["cells"][cell] = run_cell(cell, path, layout, reference)
    testing.write_report(report_path, report)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(*sys.argv[1:])
