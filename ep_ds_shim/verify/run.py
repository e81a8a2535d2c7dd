"""The checks of `python -m ep_ds_shim verify`, on every rank, for every model type (see the package docstring)."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoConfig
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from .. import experts
from ..distributed import exchange
from ..loading.block import ep_zero3_compat
from ..releases.support import ALLOW_UNVERIFIED_ENV, transformers_version
from ..testing import oracle, tiny_models, write_report
from ..training.export import save_pretrained
from ..training.deepspeed_handover import initialize
from ..training.layout import DPxEPLayout
from . import figures, quiet, report
from .known import CHECKS


def main(args) -> int:
    os.environ.setdefault(ALLOW_UNVERIFIED_ENV, "1")  # verifying a newer release is what this command is for
    rank = int(os.environ.get("RANK", "0"))
    tolerance = args.tolerance or figures.TOLERANCE[args.device]
    notice = quiet.first_run_notice(args.device)
    if notice and rank == 0:
        print(notice, flush=True)
    with quiet.held_back(args.verbose) as held:
        work = Path(args.work_dir or os.path.join("build", "ep_ds_shim_verify")) / transformers_version()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        num_experts = max(4, 2 * (args.ep_size or world))
        # Every tiny checkpoint is built before the process group exists: once torch.distributed is initialised,
        # transformers' save_pretrained writes on global rank 0 only (the first rank to take the file lock builds).
        targets = _targets(args, work, num_experts)
        with quiet.stdout_held_back(args.verbose):
            deepspeed.init_distributed(dist_backend="nccl" if args.device == "cuda" else "gloo")
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # the device on this node
        device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
        layout = DPxEPLayout(args.ep_size or dist.get_world_size())
        results = {label: verify_model_type(model_type, path, work, layout, device, tolerance)
                   for label, (model_type, path) in targets.items()}
        everyone = exchange("verify_results", results, what="the verify summary")
        # Known outcomes are decided once, on rank 0 (their probes build and load tiny models), and shared, so every
        # rank prints nothing else and exits with the same status.
        outcomes = report.classify(everyone, targets, transformers_version()) if dist.get_rank() == 0 else None
        outcomes = exchange("verify_outcomes", outcomes, what="the verify outcomes")[0]
    if dist.get_rank() == 0:
        report.print_report(outcomes, layout, tolerance, held, verbose=args.verbose)
    if args.json:
        write_report(args.json, {"rank": dist.get_rank(), "results": results, "outcomes": outcomes},
                     rank=dist.get_rank())
    dist.barrier()
    dist.destroy_process_group()
    return 0 if report.no_fail(outcomes) else 1


def _targets(args, work: Path, num_experts: int) -> dict[str, tuple[str, object]]:
    """{label: (model type, tiny checkpoint path or the error that prevented building it)}."""
    if args.model_dir:
        base = AutoConfig.from_pretrained(args.model_dir)
        label = f"{base.model_type} ({args.model_dir})"
        return {label: (base.model_type, _build(work / "own-architecture", base.model_type, num_experts, base=base))}
    model_types = args.model_types or tiny_models.ep_model_types()
    return {t: (t, _build(work / f"{t}-{num_experts}x", t, num_experts)) for t in model_types}


def _build(path: Path, model_type: str, num_experts: int, *, base=None):
    """The tiny checkpoint's path, or why it could not be built."""
    try:
        if base is not None:
            return tiny_models.build_shrunk_model(path, base, num_experts=num_experts)
        return tiny_models.build_tiny_model(path, model_type, num_experts=num_experts)
    except Exception as error:  # noqa: BLE001 - reported in the table
        return error


def _failure(error: Exception) -> dict:
    return {"ok": False, "error": _short(error), "trace": traceback.format_exc()[-2000:]}


def verify_model_type(model_type: str, path, work: Path, layout: DPxEPLayout, device, tolerance: float) -> dict:
    """Every check of one model type on this rank: {check: {"ok": bool, figures...}}."""
    out: dict = {}
    reference = failure = None
    try:
        if isinstance(path, Exception):
            raise path
        model_class = tiny_models.model_class_for(model_type)
        config = model_class.config_class.from_pretrained(path)
        batches = [_on(tiny_models.sample_inputs(config, seed=1234 + r), device) for r in range(layout.world_size)]
    except Exception as error:  # noqa: BLE001 - cannot even build the model or its inputs: every check says why
        failure = _failure(error)
    # The checks below are collective: every rank runs them, or none does (a rank that could not prepare would
    # leave the others waiting in the load).
    prepared = exchange("verify_prepare", {"error": failure and failure["error"]}, what=f"verify {model_type}")
    failed = {rank: outcome["error"] for rank, outcome in prepared.items() if outcome["error"]}
    if failed:
        rank, error = next(iter(sorted(failed.items())))
        failure = failure or {"ok": False, "error": f"rank {rank} could not prepare: {error}"}
        return {check: failure for check in CHECKS}
    try:  # a reference that cannot be computed fails the checks that need it; the EP load still runs (a refusal
        # before the load is an outcome of its own)
        reference = oracle.reference_step(path, batches, model_class=model_class, device=device)
    except Exception as error:  # noqa: BLE001
        failure = _failure(error)
        failure["error"] = "the single-process reference failed: " + failure["error"]
    engine = allowance = None
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, "zero_optimization": {"stage": 3},
                 "steps_per_print": 10**9}
    signalled = HfDeepSpeedConfig(ds_config)
    try:
        with ep_zero3_compat():
            model = model_class.from_pretrained(path, dtype=torch.float32, **layout.from_pretrained_kwargs(
                path, model_class=model_class))
        if reference is None:
            raise _NoReference()
        model.to(device)
        out["load"] = _check_load(model, reference, batches[layout.rank], layout, tolerance)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), **oracle.OPTIMIZER)
        engine, *_ = initialize(model=model, layout=layout, optimizer=optimizer, config=ds_config)
        output = engine(**batches[layout.rank])
        engine.backward(output.loss)
        grads = oracle.full_grads(engine)
        engine.step()
        step = figures.step(engine, layout, reference, logits_out=output.logits, loss=output.loss, grads=grads)
        allowance = step.pop("_allowance")
        out["step"] = {**step, "ok": all(value <= tolerance for value in step.values())}
    except _NoReference:
        for check in CHECKS:
            out.setdefault(check, failure)
    except Exception as error:  # noqa: BLE001 - a failing check is a result
        for check in ("load", "step"):
            out.setdefault(check, _failure(error))
    finally:
        del signalled
        unset_hf_deepspeed_config()
    if "export" not in out:
        out["export"] = _check_export(engine, path, model_class, reference, work / f"{model_type}-export", tolerance,
                                      allowance)
    dist.barrier()
    return out


class _NoReference(Exception):
    """The EP load ran, but there is nothing to compare it with."""


def _check_load(model, reference, batch, layout, tolerance) -> dict:
    expert_diff = 0.0
    for name, param in experts.expert_parameters(model).items():
        local = experts.local_tensor(param).detach()
        want = oracle.expert_slice(reference["initial"][name], local.shape, layout.ep_rank)
        expert_diff = max(expert_diff, float((local.float() - want.float()).abs().max()))
    model.eval()
    with torch.no_grad():
        logits = figures.logits(model(**batch).logits, reference["logits"][layout.rank])
    return {"expert_slices": expert_diff, "logits": logits, "ok": expert_diff == 0.0 and logits <= tolerance}


def _check_export(engine, path, model_class, reference, directory, tolerance, allowance) -> dict:
    if engine is None:
        return {"ok": False, "error": "not run: the training step did not complete"}
    try:
        save_pretrained(engine, directory)
        reloaded, info = model_class.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
        problems = {key: sorted(map(str, value)) for key, value in info.items() if value}
        weights = figures.exported({name: param.detach() for name, param in reloaded.named_parameters()}, reference,
                                   allowance)
        return {"loading_problems": problems, "weights": weights, "ok": not problems and weights <= tolerance}
    except Exception as error:  # noqa: BLE001
        return _failure(error)


def _on(inputs: dict, device) -> dict:
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in inputs.items()}


def _short(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
