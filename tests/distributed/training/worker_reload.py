"""One rank of "an export loads with another EP size" (run by torchrun from test_saving.py).

    worker_reload.py <export_dir> <report.json>

Loads the export with EP over the whole world (no DeepSpeed) and compares the logits with a plain
single-process load of the same directory.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def main(export_dir: str, report_path: str) -> None:
    from transformers import AutoModelForCausalLM

    import ep_ds_shim
    from ep_ds_shim import testing
    from ep_ds_shim.experts import expert_parameters, local_tensor

    dist.init_process_group("gloo")
    plain = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    kwargs = ep_ds_shim.ep_from_pretrained_kwargs(export_dir, dist.get_world_size())
    with ep_ds_shim.ep_zero3_compat():
        model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32, **kwargs).eval()
    batch = testing.batch_for(0)
    with torch.no_grad():
        diff = float((model(input_ids=batch).logits - plain(input_ids=batch).logits).abs().max())
    rows = {local_tensor(p).shape[0] for p in expert_parameters(model).values()}
    testing.write_report(report_path, {"rank": dist.get_rank(), "expert_rows": rows.pop() if len(rows) == 1 else sorted(rows),
                                       "logits_vs_plain": diff}, rank=dist.get_rank())
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(*sys.argv[1:3])
