"""The whole flow, in one command on CPU: load -> train -> checkpoint; a new job resumes and trains on; export;
reload the export in a plain single process and compare it with a single-process run of the same steps.

    python examples/finetune.py                          # 2 ranks (ep=2), fp32, 4 + 4 steps
    python examples/finetune.py --nproc 4 --ep-size 2    # dp=2 x ep=2
    python examples/finetune.py --bf16 --grad-accum 2    # DeepSpeed bf16 (compared with a single-process bf16 run)
    python examples/finetune.py --resume-nproc 4         # checkpoint on 2 ranks (ep=2), resume on 4 (ep=4)
    python examples/finetune.py --ep-size 2 --resume-nproc 4   # ... or on 4 ranks, dp=2 x ep=2
    ./run.sh finetune                                    # the same as the first line

With no --model-dir it builds a tiny random MoE checkpoint under build/examples (no hub access). The driver runs
the distributed phases with torchrun (`--phase train|resume|full`, which are also what the tests run) and prints,
per step, the loss of every phase next to the single-process reference, then what the reloaded export holds.
On GPUs run the phases under your launcher with `--device cuda`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

STEPS_BEFORE, STEPS_AFTER = 4, 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="checkpoint to fine-tune (default: a tiny MoE built under build/examples)")
    parser.add_argument("--model-type", default="qwen3_moe")
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the distributed phases (driver only)")
    parser.add_argument("--ep-size", type=int, default=None, help="expert-parallel size (default: world size)")
    parser.add_argument("--stage", type=int, default=3, choices=(0, 1, 2, 3),
                        help="ZeRO stage (EP training: 3; the single-process --no-ep reference takes any)")
    parser.add_argument("--bf16", action="store_true", help="DeepSpeed bf16 mixed precision")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="steps of the phase (default: 4, --phase full: 8)")
    parser.add_argument("--start-step", type=int, default=0, help="first step of the phase (resume: after the checkpoint)")
    parser.add_argument("--total-steps", type=int, default=STEPS_BEFORE + STEPS_AFTER, help="length of the LR schedule")
    parser.add_argument("--offload-optimizer", action="store_true", help="ZeRO offload_optimizer: {device: cpu}")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--phase", choices=("train", "resume", "full"), help="run one distributed phase (under torchrun)")
    parser.add_argument("--skip-resume", action="store_true", help="driver: only the uninterrupted run and its export")
    parser.add_argument("--resume-at", type=int, default=STEPS_BEFORE, help="driver: the step the checkpoint is taken at")
    parser.add_argument("--resume-nproc", type=int, default=None,
                        help="driver: ranks of the job that resumes (default: --nproc); another layout is converted")
    parser.add_argument("--resume-ep-size", type=int, default=None,
                        help="driver: expert-parallel size of the job that resumes (default: --ep-size)")
    parser.add_argument("--load-module-only", action="store_true",
                        help="resume phase: load the weights only (no optimizer state, step or schedule)")
    parser.add_argument("--no-ep", action="store_true", help="a plain single-process DeepSpeed run (the bf16 reference)")
    parser.add_argument("--data-replicas", type=int, default=1,
                        help="with --no-ep: train on the batches of this many ranks together")
    parser.add_argument("--checkpoint-dir", help="DeepSpeed checkpoint written by --phase train, read by --phase resume")
    parser.add_argument("--export-dir", help="where to export (ep_ds_shim.save_pretrained) after the phase")
    parser.add_argument("--max-shard-size", default="200KB", help="shards of the export (small here, to show sharding)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--work-dir", default=os.path.join("build", "examples", "finetune"))
    parser.add_argument("--json", help="write this rank's results here ({rank} is replaced)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", args.device)
    return args


def deepspeed_config(args) -> dict:
    zero = {"stage": args.stage}
    config = {
        # the single-process reference sees every replica's micro-batch at once
        "train_micro_batch_size_per_gpu": 2 * (args.data_replicas if args.no_ep else 1),
        "gradient_accumulation_steps": args.grad_accum,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": args.bf16},
        "steps_per_print": 10**9,
    }
    if args.no_ep:  # the single-process reference exports with DeepSpeed's own save_16bit_model
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if args.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = False  # the oracle's torch AdamW, not DeepSpeed's CPU Adam
    return config


def run_phase(args) -> int:
    """One distributed phase: load (inside the block), train, checkpoint or resume, export."""
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    import ep_ds_shim
    from ep_ds_shim import testing
    from ep_ds_shim.testing import oracle

    deepspeed.init_distributed(dist_backend="nccl" if args.device == "cuda" else "gloo")
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # the device on this node, not the global rank
    world, rank = dist.get_world_size(), dist.get_rank()
    config = deepspeed_config(args)
    signalled = HfDeepSpeedConfig(config)  # noqa: F841 - DeepSpeed signalled while loading, as launchers do
    if args.no_ep:
        layout, batch_ranks, batch_world = None, range(args.data_replicas), args.data_replicas
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    else:
        layout = ep_ds_shim.DPxEPLayout(args.ep_size or world)
        batch_ranks, batch_world = [rank], world  # every rank trains on its own batches
        with ep_ds_shim.ep_zero3_compat():
            model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32,
                                                         **layout.from_pretrained_kwargs(args.model_dir))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), **testing.OPTIMIZER)

    def lr_scheduler(optimizer):  # DeepSpeed builds it on the optimizer it wraps
        return torch.optim.lr_scheduler.LambdaLR(optimizer, oracle.schedule(args.total_steps))

    if layout is None:
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, lr_scheduler=lr_scheduler)
    else:
        engine, *_ = ep_ds_shim.initialize(model=model, layout=layout, optimizer=optimizer, config=config,
                                            lr_scheduler=lr_scheduler)
    if args.phase == "resume":  # one call on every rank, in any layout (another one is converted on the fly)
        ep_ds_shim.load_checkpoint(engine, args.checkpoint_dir, load_module_only=args.load_module_only) \
            if layout is not None else engine.load_checkpoint(args.checkpoint_dir)
    steps = args.steps or (args.total_steps if args.phase == "full" else args.resume_at)
    losses, grad_norms = [], []
    for step in range(args.start_step, args.start_step + steps):
        step_loss = 0.0
        for micro in range(args.grad_accum):
            batch = torch.cat([oracle.run_batch(step, micro, r, grad_accum=args.grad_accum, world=batch_world)
                               for r in batch_ranks])
            loss = engine(input_ids=batch, labels=batch).loss
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / args.grad_accum
        losses.append(step_loss)
        grad_norms.append(float(engine.get_global_grad_norm()))  # what DeepSpeed clipped with: every weight once
    if args.phase == "train":
        engine.save_checkpoint(args.checkpoint_dir)
    report = {"rank": rank, "world": world, "ep_rank": getattr(layout, "ep_rank", 0), "phase": args.phase,
              "losses": losses, "grad_norms": grad_norms, "start_step": args.start_step,
              "train_batch_size": engine.train_batch_size()}
    if args.export_dir:
        if layout is None:  # the plain single-process model: DeepSpeed's own export, next to its config
            engine.save_16bit_model(args.export_dir)
            model.config.save_pretrained(args.export_dir)
        else:
            ep_ds_shim.save_pretrained(engine, args.export_dir, max_shard_size=args.max_shard_size)
            report["export_vs_trained"] = export_vs_trained(engine, layout, args.export_dir)
    if args.json:
        testing.write_report(args.json, report, rank=rank)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def export_vs_trained(engine, layout, export_dir) -> float:
    """Max |export - the weights this rank trained| (its expert slice, every dense weight), read back from the files
    by a plain load. The weights are the module's (DeepSpeed's fp32 master copy in fp32 training)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from ep_ds_shim.testing import max_abs_diffs, oracle

    trained = {name: oracle.full_fp32(param).detach().to(param.dtype) for name, param in engine.module.named_parameters()}
    unset_hf_deepspeed_config()  # a plain load of the export, not a zero.Init one
    exported = dict(AutoModelForCausalLM.from_pretrained(export_dir).named_parameters())
    return max(max_abs_diffs(trained, {n: p.detach() for n, p in exported.items()}, layout.ep_rank).values())


def mean_losses(reports: list[dict]) -> list[float]:
    """Per step, the mean over ranks of their loss (what the single-process run on all their batches computes)."""
    per_rank = [report["losses"] for report in sorted(reports, key=lambda report: report["rank"])]
    return [sum(values) / len(values) for values in zip(*per_rank)]


def compare_export(export_dir: str, reference_params: dict) -> dict:
    """Reload the export in a plain single process; what is missing, and how far it is from the reference."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32, output_loading_info=True)
    problems = {key: sorted(map(str, value)) for key, value in info.items() if value}
    diffs = {name: float((param.detach().float() - reference_params[name].detach().float()).abs().max())
             for name, param in model.named_parameters()}
    return {"loading_problems": problems, "max_param_diff": max(diffs.values()), "tensors": len(diffs)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.phase:
        return run_phase(args)

    # The driver: builds the checkpoint, computes the single-process reference, runs the phases, compares.
    from transformers import AutoModelForCausalLM

    from ep_ds_shim import testing
    from ep_ds_shim.testing import oracle

    path = args.model_dir or str(testing.build_tiny_moe(os.path.join("build", "examples", f"tiny-{args.model_type}-8x"),
                                                        args.model_type, num_experts=8))
    os.makedirs(args.work_dir, exist_ok=True)
    work = tempfile.mkdtemp(dir=args.work_dir)
    if (args.resume_nproc or args.nproc) != args.nproc or args.resume_ep_size not in (None, args.ep_size):
        return another_layout(args, path, work)
    ref_norms = None
    if args.bf16:
        print("reference: the same run in a single process (DeepSpeed bf16, no EP)")
        reference = phases(args, path, work, nproc=1, extra=["--no-ep", "--data-replicas", str(args.nproc)],
                           full_only=True)
        ref_losses = reference["full_losses"]
        ref_params = dict(AutoModelForCausalLM.from_pretrained(reference["export"], dtype=torch.float32).named_parameters())
    else:
        print("reference: the same run in a single process (fp32, torch AdamW, same schedule)")
        ref = oracle.reference_run(path, steps=args.total_steps, grad_accum=args.grad_accum, world=args.nproc)
        ref_losses, ref_params = ref["losses"], ref["params"]
        ref_norms = ref["grad_norms"]
    run = phases(args, path, work, nproc=args.nproc, full_only=args.skip_resume)
    resumed = run.get("resumed_losses", run["full_losses"])
    print(f"{'step':>4} {'reference':>12} {'train+resume':>14} {'uninterrupted':>14}")
    for step, want in enumerate(ref_losses):
        print(f"{step:>4} {want:>12.6f} {resumed[step]:>14.6f} {run['full_losses'][step]:>14.6f}")
    curve = max(abs(a - b) for a, b in zip(ref_losses, run["full_losses"]))
    # the gradients of every step, through the global norm DeepSpeed clipped with (fp32: the reference's own)
    norms = None if ref_norms is None else max(abs(a - b) / max(1.0, b) for a, b in zip(run["full_grad_norms"], ref_norms))
    resume_gap = max(abs(a - b) for a, b in zip(resumed, run["full_losses"]))
    exported = compare_export(run["export"], ref_params)
    loss_tolerance, param_tolerance = (oracle.BF16_LOSS_TOLERANCE, oracle.BF16_PARAM_TOLERANCE) if args.bf16 \
        else (1e-5, 1e-5)
    ok = curve <= loss_tolerance and resume_gap <= 1e-6 and exported["max_param_diff"] <= param_tolerance \
        and not exported["loading_problems"] and run["export_vs_trained"] <= 1e-6 and (norms is None or norms <= 1e-5)
    print(f"uninterrupted vs reference: max |dloss| {curve:.2e} (tolerance {loss_tolerance:g})"
          + ("" if norms is None else f", max relative |dgrad norm| {norms:.2e} (tolerance 1e-5)")
          + f"; train+resume vs uninterrupted: max |dloss| {resume_gap:.2e}")
    print(f"DeepSpeed's train_batch_size {run['train_batch_size']} = micro 2 x accumulation {args.grad_accum} x "
          f"{args.nproc} ranks")
    print(f"export vs the weights each rank trained: max |d| {run['export_vs_trained']:.2e}")
    print(f"export {run['export']}: {exported['tensors']} tensors, loading problems {exported['loading_problems'] or 'none'}, "
          f"max |dparam| vs reference {exported['max_param_diff']:.2e} (tolerance {param_tolerance:g}) "
          f"-> {'MATCH' if ok else 'MISMATCH'}")
    if args.json:
        with open(args.json.format(rank=0), "w") as handle:
            json.dump({"reference": ref_losses, **{k: v for k, v in run.items() if k.endswith("losses")},
                       "curve_max_diff": curve, "grad_norm_max_rel_diff": norms,
                       "train_batch_size": run["train_batch_size"], "resume_max_diff": resume_gap, "export": exported,
                       "export_vs_trained": run["export_vs_trained"],
                       "export_dir": run["export"], "ok": ok}, handle, indent=1)
    return 0 if ok else 1


def phases(args, path: str, work: str, *, nproc: int, extra=(), full_only: bool = False, resume_nproc=None,
           resume_extra=(), skip_full: bool = False) -> dict:
    """Run the distributed phases with torchrun: train + checkpoint, resume + export (on `resume_nproc` ranks with
    `resume_extra` arguments: another layout), and (for comparison, unless `skip_full`) the same steps uninterrupted.
    Returns the losses per step and where the export is."""
    from ep_ds_shim.testing import run_job, torchrun

    common = [__file__, "--model-dir", path, "--stage", str(args.stage), "--grad-accum", str(args.grad_accum),
              "--total-steps", str(args.total_steps), "--json", "{json}", *extra,
              *(["--ep-size", str(args.ep_size)] if args.ep_size else []), *(["--bf16"] if args.bf16 else []),
              *(["--offload-optimizer"] if args.offload_optimizer else []),
              *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])]

    def launch(*phase_args, ranks=nproc):
        result = run_job(torchrun(ranks, *common, *phase_args), nproc=ranks, timeout=1800)
        if not result.ok or len(result.reports) != ranks:
            raise SystemExit(f"phase {phase_args[:2]} failed:\n{result.output[-6000:]}")
        return result.reports

    out = {"export_vs_trained": 0.0}
    if not skip_full:
        full_export = os.path.join(work, "export-uninterrupted")
        full = launch("--phase", "full", "--export-dir", full_export)
        out["full_losses"] = mean_losses(full)
        out["full_grad_norms"] = full[0]["grad_norms"]  # the same global norm on every rank
        out["train_batch_size"] = full[0]["train_batch_size"]
        out["export"] = full_export
        out["export_vs_trained"] = max(report.get("export_vs_trained", 0.0) for report in full)
    if full_only:
        return out
    checkpoint = os.path.join(work, "checkpoint")
    first = launch("--phase", "train", "--checkpoint-dir", checkpoint, "--resume-at", str(args.resume_at))
    export = os.path.join(work, "export")
    second = launch("--phase", "resume", "--checkpoint-dir", checkpoint, "--start-step", str(args.resume_at),
                    "--steps", str(args.total_steps - args.resume_at), "--export-dir", export, *resume_extra,
                    ranks=resume_nproc or nproc)
    out["resumed_losses"] = mean_losses(first) + mean_losses(second)
    out["checkpoint"] = checkpoint
    out["export"] = export
    out["export_vs_trained"] = max(out["export_vs_trained"], *(report.get("export_vs_trained", 0.0) for report in second))
    return out


def another_layout(args, path: str, work: str) -> int:
    """The driver when the job that resumes has another layout: checkpoint at step --resume-at on --nproc ranks,
    resume on --resume-nproc ranks (--resume-ep-size), compared with a single process that trains on every rank's
    batches of each step (the first steps' ranks, then the resuming job's)."""
    from transformers import AutoModelForCausalLM

    from ep_ds_shim.testing import oracle

    after = args.resume_nproc or args.nproc
    resume_extra = ["--ep-size", str(args.resume_ep_size)] if args.resume_ep_size else []
    if args.bf16:  # a single-process DeepSpeed bf16 run that resumes with the new job's batches
        print("reference: the same run in a single process (DeepSpeed bf16, no EP), resumed with the new ranks' batches")
        reference = phases(args, path, os.path.join(work, "reference"), nproc=1, skip_full=True,
                           extra=["--no-ep", "--data-replicas", str(args.nproc)],
                           resume_extra=["--data-replicas", str(after)])
        ref_losses = reference["resumed_losses"]
        ref_params = dict(AutoModelForCausalLM.from_pretrained(reference["export"], dtype=torch.float32).named_parameters())
        loss_tolerance, param_tolerance = oracle.BF16_LOSS_TOLERANCE, oracle.BF16_PARAM_TOLERANCE
    else:
        print("reference: the same steps in a single process (fp32), on every rank's batches of each step")
        worlds = [args.nproc] * args.resume_at + [after] * (args.total_steps - args.resume_at)
        ref = oracle.reference_run(path, steps=args.total_steps, grad_accum=args.grad_accum, world=worlds)
        ref_losses, ref_params = ref["losses"], ref["params"]
        loss_tolerance, param_tolerance = 1e-5, 1e-5
    run = phases(args, path, work, nproc=args.nproc, skip_full=True, resume_nproc=after, resume_extra=resume_extra)
    resumed = run["resumed_losses"]
    print(f"{'step':>4} {'reference':>12} {'resumed':>12}   (checkpoint at step {args.resume_at}: {args.nproc} ranks "
          f"ep={args.ep_size or args.nproc} -> {after} ranks ep={args.resume_ep_size or args.ep_size or after})")
    for step, want in enumerate(ref_losses):
        print(f"{step:>4} {want:>12.6f} {resumed[step]:>12.6f}")
    gap = max(abs(a - b) for a, b in zip(resumed, ref_losses))
    exported = compare_export(run["export"], ref_params)
    ok = (len(resumed) == len(ref_losses) and gap <= loss_tolerance and exported["max_param_diff"] <= param_tolerance
          and not exported["loading_problems"] and run["export_vs_trained"] <= 1e-6)
    print(f"resumed on the new layout vs reference: max |dloss| {gap:.2e} (tolerance {loss_tolerance:g}); export "
          f"max |dparam| {exported['max_param_diff']:.2e} (tolerance {param_tolerance:g}) -> {'MATCH' if ok else 'MISMATCH'}")
    if args.json:
        with open(args.json.format(rank=0), "w") as handle:
            json.dump({"reference": ref_losses, "resumed_losses": resumed, "resume_max_diff": gap, "export": exported,
                       "export_vs_trained": run["export_vs_trained"], "export_dir": run["export"],
                       "checkpoint": run["checkpoint"], "ok": ok}, handle, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
