"""One rank of the "ranks that disagree" checks (run by torchrun from test_stages.py).

    worker_disagree.py <checkpoint> <mode> <report.json>

mode "dtype":    rank 1 loads in bfloat16, rank 0 in float32 (ZeRO-3 signalled, inside the block, layout path).
mode "no-ep":    rank 1 loads without the EP arguments (ZeRO-3 signalled, both inside the block).
mode "versions": rank 1 runs another transformers release than rank 0 (simulated by its reported version).
Each rank records what was raised, and where; a rank stuck in a collective is ended by torchrun when another rank
exits with an error, so every report that exists was written before that.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.distributed as dist


def main(path: str, mode: str, report_path: str) -> None:
    import deepspeed
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    import ep_ds_shim
    from ep_ds_shim import testing

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    layout = ep_ds_shim.DPxEPLayout(dist.get_world_size())
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}
    hf = HfDeepSpeedConfig(config)  # noqa: F841 - keeps ZeRO-3 signalled
    report = {"rank": rank, "mode": mode, "stage": "load", "raised": None}
    dtype = torch.bfloat16 if mode == "dtype" and rank == 1 else torch.float32
    kwargs = {} if mode == "no-ep" and rank == 1 else layout.from_pretrained_kwargs(path)
    if mode == "versions" and rank == 1:  # the module currently imported as `transformers` (it replaces itself)
        sys.modules["transformers"].__version__ = transformers.__version__ + ".post1"
    try:
        with ep_ds_shim.ep_zero3_compat(allow_unverified=True):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
        report["stage"] = "initialize"
        engine, *_ = ep_ds_shim.initialize(model=model, layout=layout, config=config,
                                            optimizer=torch.optim.AdamW(model.parameters(), **testing.OPTIMIZER))
        report["stage"] = "forward"
        batch = testing.batch_for(layout.rank)
        engine(input_ids=batch, labels=batch)
        report["stage"] = "done"
    except Exception as error:  # noqa: BLE001 - recorded for the test
        report["raised"] = type(error).__name__
        report["message"] = str(error)
        report["trace"] = traceback.format_exc()[-2000:]
    testing.write_report(report_path, report)
    if report["raised"]:
        sys.exit(1)  # like a user's script: the launcher then ends the other ranks
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(*sys.argv[1:4])
