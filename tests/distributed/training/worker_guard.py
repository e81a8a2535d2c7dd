"""One rank of the DeepSpeed safety checks (run by torchrun from test_training.py).

    worker_guard.py <checkpoint> <mode> <report.json>

mode "upstream": load inside the block, then the upstream recipe `deepspeed.initialize(model, optimizer,
config)` with no groups, then a training step; records what was raised and where.
mode "corrupt": load inside the block, overwrite part of rank 1's expert shard, then `ep_ds_shim.initialize`;
records what was raised.
mode "mpu": the 0.2 habit, `deepspeed.initialize(..., mpu=<data parallel over same-expert ranks>)` inside
`supply_deepspeed_groups`; records the error.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist


def main(path: str, mode: str, report_path: str) -> None:
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    import ep_ds_shim
    from ep_ds_shim import testing
    from ep_ds_shim.experts import expert_parameters

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = ep_ds_shim.DPxEPLayout(world)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}
    hf = HfDeepSpeedConfig(config)  # noqa: F841 - keeps ZeRO-3 signalled
    with ep_ds_shim.ep_zero3_compat():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **layout.from_pretrained_kwargs(path))
    optimizer = torch.optim.AdamW(model.parameters(), **testing.OPTIMIZER)
    report = {"rank": rank, "mode": mode, "stage": None, "raised": None, "message": None}
    x = testing.batch_for(0)
    try:
        if mode == "upstream":
            report["stage"] = "initialize"
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            report["stage"] = "forward"
            loss = engine(input_ids=x, labels=x).loss
            report["stage"] = "backward"
            engine.backward(loss)
            report["stage"] = "step"
            engine.step()
            report["stage"] = "done"
        elif mode == "corrupt":
            if layout.ep_rank == 1:
                name, param = next(iter(expert_parameters(model).items()))
                with torch.no_grad():
                    param[0].add_(1.0)  # what a stray broadcast or a bad checkpoint slice would do
                report["corrupted"] = name
            report["stage"] = "initialize"
            ep_ds_shim.initialize(model=model, layout=layout, optimizer=optimizer, config=config)
            report["stage"] = "done"
        elif mode == "mpu":
            class SameExpertsDataParallel:  # what DPxEPLayout.mpu() gave in 0.2
                def get_data_parallel_group(self):
                    return layout.dp_group

                def get_data_parallel_rank(self):
                    return layout.dp_rank

                def get_data_parallel_world_size(self):
                    return layout.dp_size

                def get_model_parallel_group(self):
                    return layout.ep_group

                def get_model_parallel_rank(self):
                    return layout.ep_rank

                def get_model_parallel_world_size(self):
                    return layout.ep_size

            report["stage"] = "initialize"
            with ep_ds_shim.supply_deepspeed_groups(layout):
                engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                  mpu=SameExpertsDataParallel())
            report["stage"] = "forward"
            engine(input_ids=x, labels=x)
            report["stage"] = "done"
        else:
            raise SystemExit(f"unknown mode {mode}")
    except Exception as error:  # noqa: BLE001 - recorded for the test
        report["raised"] = type(error).__name__
        report["message"] = str(error)
    with open(report_path.format(rank=rank), "w") as handle:
        json.dump(report, handle, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(*sys.argv[1:4])
