"""`python -m ep_ds_shim verify`: check the shim on your own machines, against a single-process model.

Run it under your launcher, on every rank (CPU with gloo, or GPUs with NCCL and ``--device cuda``: the same code):

    torchrun --nproc_per_node 2 -m ep_ds_shim verify
    deepspeed --num_gpus 8 --module ep_ds_shim verify --device cuda --ep-size 8
    accelerate launch -m ep_ds_shim verify

For every MoE model type the installed transformers can expert-parallelise (or the ones named with --model-type) it
builds a tiny random checkpoint locally (no hub), then checks, each against a single-process model of the same
checkpoint on the same device:

  load    EP load while ZeRO-3 is signalled, inside `ep_zero3_compat`: every rank holds its own slice of every
          expert tensor, and the logits equal the single-process model's;
  step    `ep_ds_shim.initialize` + one training step, every rank on its own batch: loss, logits, gradients,
          DeepSpeed's global gradient norm and every weight after the AdamW step equal the single-process step on
          all ranks' batches together;
  export  `ep_ds_shim.save_pretrained`, reloaded in a plain single process: no missing, unexpected or mismatched
          keys, every weight equal to the single-process model after the step.

It prints one table (pass / fail per check, with the largest difference over all ranks) and exits 0 only when
every check passed. On a release newer than the verified range it runs with the opt-in, so this is how you decide
whether to set EP_DS_SHIM_ALLOW_UNVERIFIED=1.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from . import experts
from .distributed import exchange
from .loading.block import ep_zero3_compat
from .releases.support import ALLOW_UNVERIFIED_ENV, transformers_version
from .testing import oracle, tiny_models, write_report
from .training.export import save_pretrained
from .training.handover import initialize
from .training.layout import DPxEPLayout

CHECKS = ("load", "step", "export")
TOLERANCE = {"cpu": 1e-5, "cuda": 1e-4}  # CUDA kernels may sum in another order than the reference's


def main(args) -> int:
    os.environ.setdefault("DS_ACCELERATOR", args.device)
    os.environ.setdefault(ALLOW_UNVERIFIED_ENV, "1")  # verifying a newer release is what this command is for
    work = Path(args.work_dir or os.path.join("build", "ep_ds_shim_verify")) / transformers_version()
    model_types = args.model_types or tiny_models.ep_model_types()
    num_experts = max(4, 2 * (args.ep_size or int(os.environ.get("WORLD_SIZE", "1"))))
    # Every tiny checkpoint is built before the process group exists: once torch.distributed is initialised,
    # transformers' save_pretrained writes on global rank 0 only (the first rank to take the file lock builds).
    checkpoints = {model_type: _build(model_type, work, num_experts) for model_type in model_types}
    deepspeed.init_distributed(dist_backend="nccl" if args.device == "cuda" else "gloo")
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # the device on this node
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    layout = DPxEPLayout(args.ep_size or dist.get_world_size())
    tolerance = TOLERANCE[args.device]
    results = {}
    for model_type in model_types:
        results[model_type] = verify_model_type(model_type, checkpoints[model_type], work, layout, device, tolerance)
    everyone = exchange("verify_results", results, what="the verify summary")
    if dist.get_rank() == 0:
        print_table(everyone, layout, tolerance)
    if args.json:
        write_report(args.json, {"rank": dist.get_rank(), "results": results}, rank=dist.get_rank())
    ok = all(result.get("ok") for per_rank in everyone.values() for by_check in per_rank.values()
             for result in by_check.values())
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


def _build(model_type: str, work: Path, num_experts: int):
    """The tiny checkpoint's path, or why it could not be built."""
    try:
        return tiny_models.build_tiny_model(work / f"{model_type}-{num_experts}x", model_type, num_experts=num_experts)
    except Exception as error:  # noqa: BLE001 - reported in the table
        return error


def verify_model_type(model_type: str, path, work: Path, layout: DPxEPLayout, device, tolerance: float) -> dict:
    """Every check of one model type on this rank: {check: {"ok": bool, figures...}}."""
    out: dict = {}
    failure = None
    try:
        if isinstance(path, Exception):
            raise path
        model_class = tiny_models.model_class_for(model_type)
        config = model_class.config_class.from_pretrained(path)
        batches = [_on(tiny_models.sample_inputs(config, seed=1234 + r), device) for r in range(layout.world_size)]
        reference = oracle.reference_step(path, batches, model_class=model_class, device=device)
    except Exception as error:  # noqa: BLE001 - cannot even build the reference: every check says why
        failure = {"ok": False, "error": _short(error), "trace": traceback.format_exc()[-2000:]}
    # The checks below are collective: every rank runs them, or none does (a rank that could not prepare would
    # leave the others waiting in the load).
    prepared = exchange("verify_prepare", {"error": failure and failure["error"]}, what=f"verify {model_type}")
    failed = {rank: outcome["error"] for rank, outcome in prepared.items() if outcome["error"]}
    if failed:
        rank, error = next(iter(sorted(failed.items())))
        failure = failure or {"ok": False, "error": f"rank {rank} could not prepare: {error}"}
        return {check: failure for check in CHECKS}
    engine = None
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, "zero_optimization": {"stage": 3},
                 "steps_per_print": 10**9}
    signalled = HfDeepSpeedConfig(ds_config)
    try:
        with ep_zero3_compat():
            model = model_class.from_pretrained(path, dtype=torch.float32, **layout.from_pretrained_kwargs(
                path, model_class=model_class))
        model.to(device)
        out["load"] = _check_load(model, reference, batches[layout.rank], layout, tolerance)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), **oracle.OPTIMIZER)
        engine, *_ = initialize(model=model, layout=layout, optimizer=optimizer, config=ds_config)
        batch = batches[layout.rank]
        output = engine(**batch)
        engine.backward(output.loss)
        grads = oracle.full_grads(engine)
        engine.step()
        step = oracle.compare_step(engine, layout, reference, logits=output.logits, loss=output.loss, grads=grads,
                                   tolerance=tolerance, weights_tolerance=oracle.param_tolerance(tolerance))
        out["step"] = step
    except Exception as error:  # noqa: BLE001 - a failing check is a result
        failure = {"ok": False, "error": _short(error), "trace": traceback.format_exc()[-2000:]}
        for check in ("load", "step"):
            out.setdefault(check, failure)
    finally:
        del signalled
        unset_hf_deepspeed_config()
    out["export"] = _check_export(engine, path, model_class, reference, work / f"{model_type}-export", tolerance)
    dist.barrier()
    return out


def _check_load(model, reference, batch, layout, tolerance) -> dict:
    expert_diff = 0.0
    for name, param in experts.expert_parameters(model).items():
        local = experts.local_tensor(param).detach()
        want = oracle.expert_slice(reference["initial"][name], local.shape, layout.ep_rank)
        expert_diff = max(expert_diff, float((local.float() - want.float()).abs().max()))
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    logits_diff = float((logits.float() - reference["logits"][layout.rank].float()).abs().max())
    return {"expert_slices": expert_diff, "logits": logits_diff,
            "ok": expert_diff == 0.0 and logits_diff <= tolerance}


def _check_export(engine, path, model_class, reference, directory, tolerance) -> dict:
    if engine is None:
        return {"ok": False, "error": "not run: the training step did not complete"}
    try:
        save_pretrained(engine, directory)
        reloaded, info = model_class.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
        problems = {key: sorted(map(str, value)) for key, value in info.items() if value}
        exported = {name: param.detach() for name, param in reloaded.named_parameters()}
        wanted = {name: reference["params"][name].cpu() for name in exported}  # whole tensors on both sides
        diff = max(oracle.max_abs_diffs(exported, wanted, ep_rank=0).values(), default=0.0)
        # the export holds the weights after the step: Adam's bound on them, as in the step check
        return {"loading_problems": problems, "params": diff,
                "ok": not problems and diff <= oracle.param_tolerance(tolerance)}
    except Exception as error:  # noqa: BLE001
        return {"ok": False, "error": _short(error), "trace": traceback.format_exc()[-2000:]}


def _on(inputs: dict, device) -> dict:
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in inputs.items()}


def _short(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]


def print_table(everyone: dict[int, dict], layout, tolerance: float) -> None:
    """One line per model type and check, the worst figure over all ranks."""
    write = sys.stdout.write
    first = everyone[min(everyone)]
    write(f"ep-ds-shim verify: transformers {transformers_version()}, {layout}, tolerance {tolerance:g} "
          f"(weights after the Adam step: {oracle.param_tolerance(tolerance):g})\n")
    write(f"{'model type':<24} {'check':<7} {'result':<6} figures (max over ranks)\n")
    for model_type in first:
        for check in CHECKS:
            per_rank = [everyone[rank][model_type].get(check, {}) for rank in sorted(everyone)]
            ok = all(result.get("ok") for result in per_rank)
            error = next((result["error"] for result in per_rank if result.get("error")), None)
            figures = {}
            for result in per_rank:
                for key, value in result.items():
                    if isinstance(value, float):
                        figures[key] = max(figures.get(key, 0.0), value)
                    elif key == "loading_problems" and value:
                        figures[key] = value
            detail = error or " ".join(f"{k}={v:.1e}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
            write(f"{model_type:<24} {check:<7} {'pass' if ok else 'FAIL':<6} {detail}\n")
    sys.stdout.flush()
