"""One rank of the loading checks (run by torchrun from test_loading.py / the matrix).

    worker_load.py <checkpoint> <report.json>

In one process group it: (1) reproduces the released failure (EP load while ZeRO-3 is signalled, no block);
(2) loads inside the block and records how each rank's experts, buffers and logits compare with a
single-process model; (3) loads EP-only (ZeRO-3 not signalled) and records how that load compares with (2).
Numbers only: the assertions live in the test.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist


def zero3_config():
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def main(path: str, report_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from transformers import AutoModelForCausalLM

    import ep_ds_shim
    from ep_ds_shim import testing
    from ep_ds_shim.experts import is_expert_parameter_name, local_tensor

    report = {"rank": rank, "world": world}
    x = testing.batch_for(0)

    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref_params = dict(reference.named_parameters())
    with torch.no_grad():
        ref_logits = reference(input_ids=x).logits

    def ep_kwargs():
        return ep_ds_shim.ep_from_pretrained_kwargs(path, world)

    # (1) The released behaviour: no block.
    hf = zero3_config()
    try:
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **ep_kwargs())
        report["without_block"] = {"raised": None}
    except Exception as error:  # noqa: BLE001 - recorded for the test to assert on
        report["without_block"] = {"raised": type(error).__name__, "message": str(error)}
    dist.barrier()

    # (2) Inside the block, ZeRO-3 still signalled.
    try:
        with ep_ds_shim.ep_zero3_compat():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **ep_kwargs()).eval()
    except Exception:  # noqa: BLE001
        report["with_block"] = {"error": traceback.format_exc()}
        write(report_path, report)
        raise
    ep_rank = rank % world
    experts = {}
    for name, param in model.named_parameters():
        if is_expert_parameter_name(name):
            local = local_tensor(param)
            expected = testing.expert_slice(ref_params[name].detach(), local.shape, ep_rank)
            experts[name] = {"shape": list(local.shape), "max_diff_vs_slice": max_diff(local.detach(), expected),
                             "full_shape": list(ref_params[name].shape)}
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    buffers = {n: max_diff(b, dict(reference.named_buffers())[n]) for n, b in model.named_buffers()}
    with torch.no_grad():
        logits = model(input_ids=x).logits
    report["with_block"] = {
        "experts": experts,
        "meta_tensors": meta,
        "buffer_max_diff": max(buffers.values(), default=0.0),
        "logits_max_diff": max_diff(logits, ref_logits),
        "zero3_signalled_during_load": True,
    }
    block_state = {n: local_tensor(p).detach().clone() for n, p in model.named_parameters()}
    del hf
    gc.collect()

    # (3) EP only: what the block must reproduce exactly.
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    assert not is_deepspeed_zero3_enabled()
    ep_only = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **ep_kwargs()).eval()
    with torch.no_grad():
        ep_logits = ep_only(input_ids=x).logits
    ep_state = {n: local_tensor(p).detach() for n, p in ep_only.named_parameters()}
    report["ep_only_vs_block"] = {
        "same_names": sorted(ep_state) == sorted(block_state),
        "param_max_diff": max(max_diff(ep_state[n], block_state[n]) for n in ep_state),
        "logits_max_diff": max_diff(ep_logits, logits),
        "ep_only_logits_vs_reference": max_diff(ep_logits, ref_logits),
    }
    write(report_path, report)
    dist.barrier()
    dist.destroy_process_group()


def write(report_path: str, report: dict) -> None:
    with open(report_path.format(rank=report["rank"]), "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(*sys.argv[1:3])
