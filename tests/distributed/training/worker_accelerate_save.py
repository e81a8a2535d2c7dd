"""One rank of accelerate's save paths (run by `accelerate launch` from test_saving.py).

    worker_accelerate_save.py <checkpoint> <output_dir> <report.json>

After one step through `Accelerator.prepare` (inside `supply_deepspeed_groups`): `accelerator.get_state_dict(model)`
and `accelerator.save_model(model, output_dir/accelerate)`, each recorded as what it returned / wrote or what it
raised; DeepSpeed's `save_16bit_model(output_dir/sixteen)`; then `ep_ds_shim.save_pretrained(model,
output_dir/export)` for comparison.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch


def main(path: str, output_dir: str, report_path: str) -> None:
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    import ep_ds_shim
    from ep_ds_shim import testing
    from ep_ds_shim.experts import is_expert_parameter_name

    accelerator = Accelerator()
    import torch.distributed as dist

    rank = dist.get_rank()
    layout = ep_ds_shim.DPxEPLayout(dist.get_world_size())
    with ep_ds_shim.ep_zero3_compat():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **layout.from_pretrained_kwargs(path))
    optimizer = torch.optim.AdamW(model.parameters(), **testing.OPTIMIZER)
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    ds_config["train_micro_batch_size_per_gpu"] = 2
    ds_config["train_batch_size"] = 2 * dist.get_world_size()  # accelerate counts one process for DeepSpeed on CPU
    with ep_ds_shim.supply_deepspeed_groups(layout):
        model, optimizer = accelerator.prepare(model, optimizer)
    batch = testing.batch_for(layout.rank)
    out = model(input_ids=batch, labels=batch)
    accelerator.backward(out.loss)
    optimizer.step()
    report = {"rank": rank, "stage": model.zero_optimization_stage()}
    for name, call in (("get_state_dict", lambda: accelerator.get_state_dict(model)),
                       ("save_model", lambda: accelerator.save_model(model, os.path.join(output_dir, "accelerate")))):
        try:
            result = call()
            report[name] = {"raised": None, "returned": None if result is None else {
                k: list(v.shape) for k, v in result.items() if is_expert_parameter_name(k)}}
        except Exception as error:  # noqa: BLE001 - recorded for the test
            report[name] = {"raised": type(error).__name__, "message": str(error), "trace": traceback.format_exc()[-1500:]}
    model.save_16bit_model(os.path.join(output_dir, "sixteen"))  # `model` is the DeepSpeed engine here
    ep_ds_shim.save_pretrained(model, os.path.join(output_dir, "export"))
    testing.write_report(report_path, report, rank=rank)
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(*sys.argv[1:4])
