"""One rank of the checkpoint checks (run by torchrun from test_checkpoints.py).

    worker_checkpoints.py <model> <checkpoint_dir> <report.json> --mode save|resume|cases [options]

- save: train --steps steps and save (default tag, or --tag) after each step in --save-at; this rank's state
  fingerprint and the loss on a fixed batch are reported before every save. --kill POINT on --victim makes that rank
  SIGKILL itself at POINT of the last save (fault injection: what a dead rank leaves behind).
- resume: load_checkpoint (optionally --tag, --module-only), report the fingerprint, the whole state, the step and the
  fixed-batch loss, or the error raised; --save-to saves it again there.
- cases: after two saves, every way of calling load_checkpoint / save_checkpoint wrongly; each error is reported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import traceback

import torch
import torch.distributed as dist

KILL_POINTS = ("deepspeed-write", "before-digest", "before-record", "before-latest", "mid-swap-fallback",
               "during-conversion")


def fingerprint(engine) -> str:
    """This rank's whole training state: its fp32 partitions, Adam moments and steps, the step count and schedule."""
    sha = hashlib.sha256()
    zero = engine.optimizer
    for flat in zero.fp32_partitioned_groups_flat:
        sha.update(flat.detach().numpy().tobytes())
        state = zero.optimizer.state.get(flat, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in state:
                sha.update(state[key].detach().float().numpy().tobytes())
    sha.update(json.dumps([engine.global_steps, engine.lr_scheduler.state_dict()["last_epoch"]]).encode())
    return sha.hexdigest()


def full_state(engine, layout) -> dict:
    """Every parameter's whole training state as this rank sees it, in a form that does not depend on the layout:
    {name: {state: sha256}}, an expert tensor per global expert (`name#<expert>`); and each parameter group's
    hyperparameters and Adam step. Comparing two jobs' merged reports shows whether the state moved exactly."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from ep_ds_shim.experts import is_expert_parameter_name

    def moment(param, key):
        try:
            return safe_get_full_optimizer_state(param, key)
        except KeyError:  # no Adam state yet (a fresh engine, a weights-only load)
            return None

    def digest(tensor) -> str:
        return "none" if tensor is None else hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()

    out = {}
    for name, param in engine.module.named_parameters():
        states = {"fp32": safe_get_full_fp32_param(param), "exp_avg": moment(param, "exp_avg"),
                  "exp_avg_sq": moment(param, "exp_avg_sq")}
        if is_expert_parameter_name(name):
            rows = states["fp32"].shape[0]
            for row in range(rows):
                out[f"{name}#{layout.ep_rank * rows + row}"] = {
                    key: digest(None if value is None else value[row]) for key, value in states.items()}
        else:
            out[name] = {key: digest(value) for key, value in states.items()}
    zero = engine.optimizer
    groups = [{key: (list(value) if isinstance(value, tuple) else value) for key, value in group.items()
               if key != "params" and isinstance(value, (int, float, str, bool, tuple, type(None)))}
              for group in zero.optimizer.param_groups]
    steps = sorted({float(state["step"]) for state in zero.optimizer.state.values() if "step" in state})
    return {"parameters": out, "groups": groups, "adam_steps": steps, "global_steps": engine.global_steps,
            "lr_scheduler_last_epoch": engine.lr_scheduler.state_dict()["last_epoch"]}


def fixed_batch_loss(engine) -> float:
    from ep_ds_shim import testing

    batch = testing.batch_for(1000 + dist.get_rank())
    with torch.no_grad():
        return float(engine(input_ids=batch, labels=batch).loss)


def arm(point: str) -> None:
    """SIGKILL this process at `point` of the next save."""
    from ep_ds_shim.training.checkpoints import durable, save

    def die(*_, **__):
        os.kill(os.getpid(), signal.SIGKILL)

    if point in ("deepspeed-write", "during-conversion"):
        # a save: this rank's model states are written, its optimizer states are not; a conversion: some of this
        # rank's files are written, not all
        original, calls, fatal = torch.save, [], 2 if point == "deepspeed-write" else 4

        def saving(*args, **kwargs):
            calls.append(1)
            if len(calls) == fatal:
                die()
            return original(*args, **kwargs)

        torch.save = saving
    elif point == "before-digest":  # DeepSpeed wrote every file of this rank; nothing flushed or agreed
        save.own_files = die
    elif point == "before-record":  # every rank agreed; rank 0 has not written the record
        durable.write_json_atomic = die
    elif point == "before-latest":  # the tag is in place; `latest` not yet updated
        original_write = durable.write_atomic
        durable.write_atomic = lambda path, data: die() if path.endswith("latest") else original_write(path, data)
    elif point == "mid-swap-fallback":  # no atomic exchange: the old tag renamed away, the new one not yet in place
        durable.exchange_paths = lambda first, second: False
        original_rename = os.rename

        def renaming(source, target):
            if ".incoming-" in os.path.basename(os.fspath(source)):  # the old tag is already renamed away
                die()
            return original_rename(source, target)

        os.rename = renaming
    else:
        raise SystemExit(f"unknown kill point {point}")


def build_engine(model_dir: str, ep_size: int, *, param_groups: int = 1, bf16: bool = False):
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    import ep_ds_shim
    from ep_ds_shim import testing
    from ep_ds_shim.testing import oracle

    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": 3}, "steps_per_print": 10**9, "bf16": {"enabled": bf16}}
    signalled = HfDeepSpeedConfig(config)  # noqa: F841 - DeepSpeed signalled while loading, as launchers do
    layout = ep_ds_shim.DPxEPLayout(ep_size)
    with ep_ds_shim.ep_zero3_compat():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                     **layout.from_pretrained_kwargs(model_dir))
    if param_groups == 2:  # as the Trainer groups them: no weight decay on norm weights
        norms = [p for n, p in model.named_parameters() if "norm" in n]
        others = [p for n, p in model.named_parameters() if "norm" not in n]
        groups = [{"params": others}, {"params": norms, "weight_decay": 0.0, "lr": testing.OPTIMIZER["lr"] / 2}]
    else:
        groups = model.parameters()
    optimizer = torch.optim.AdamW(groups, **testing.OPTIMIZER)
    engine, *_ = ep_ds_shim.initialize(
        model=model, layout=layout, optimizer=optimizer, config=config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, oracle.schedule(8)))
    return engine, layout


def train_step(engine, step: int) -> float:
    from ep_ds_shim.testing import oracle

    batch = oracle.run_batch(step, 0, dist.get_rank(), grad_accum=1, world=dist.get_world_size())
    loss = engine(input_ids=batch, labels=batch).loss
    engine.backward(loss)
    engine.step()
    return float(loss)


def outcome(call) -> dict:
    try:
        result = call()
        return {"raised": None, "returned": repr(result)[:200]}
    except Exception as error:  # noqa: BLE001 - recorded for the test
        return {"raised": type(error).__name__, "message": str(error), "trace": traceback.format_exc()[-1500:]}


def save_mode(args, engine, layout, report) -> None:
    report["saves"] = []
    save_at = [int(step) for step in args.save_at.split(",")]
    for step in range(max(save_at)):
        train_step(engine, step)
        if step + 1 in save_at:
            report["saves"].append({"step": engine.global_steps, "fingerprint": fingerprint(engine),
                                    "loss": fixed_batch_loss(engine), "state": full_state(engine, layout)})
            write(args, report)  # before the save: a killed rank has reported what it saved
            if step + 1 == max(save_at) and args.kill and dist.get_rank() == args.victim:
                arm(args.kill)
            engine.save_checkpoint(args.checkpoint_dir, tag=args.tag)


def resume_mode(args, engine, layout, report) -> None:
    tag = args.tag
    if args.tag_per_rank:
        tag = args.tag_per_rank.split(",")[dist.get_rank()]
    import ep_ds_shim

    if args.kill and dist.get_rank() == args.victim:
        arm(args.kill)
    result = outcome(lambda: ep_ds_shim.load_checkpoint(engine, args.checkpoint_dir, tag,
                                                        load_module_only=args.module_only))
    report.update(result)
    if result["raised"] is None:
        report.update(step=engine.global_steps, fingerprint=fingerprint(engine), loss=fixed_batch_loss(engine),
                      state=full_state(engine, layout))
        if args.save_to:  # the resumed state, saved again in this layout (a round trip's way back)
            engine.save_checkpoint(args.save_to)
        if args.train_after:  # the next step trains from the resumed state
            report["next_loss"] = train_step(engine, engine.global_steps)


def cases_mode(args, engine, layout, report) -> None:
    """Two saves (tags A and B), then every wrong way in, each on every rank."""
    root = args.checkpoint_dir
    train_step(engine, 0)
    engine.save_checkpoint(root, tag="A")
    train_step(engine, 1)
    engine.save_checkpoint(root, tag="B")
    rank = dist.get_rank()
    if rank == 0:  # damaged copies of B (tag directories may be copied or renamed: the record is inside)
        for name in ("partial", "swapped", "unrecorded", "notjson", "traversal", "stage2"):
            shutil.copytree(os.path.join(root, "B"), os.path.join(root, name))
        optim = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        with open(os.path.join(root, "partial", optim), "r+b") as handle:
            handle.truncate(os.path.getsize(os.path.join(root, "B", optim)) // 2)
        shutil.copyfile(os.path.join(root, "A", optim), os.path.join(root, "swapped", optim))
        os.unlink(os.path.join(root, "unrecorded", "ep_ds_shim_checkpoint.json"))
        with open(os.path.join(root, "notjson", "ep_ds_shim_checkpoint.json"), "wb") as handle:
            handle.write(b"\x80\x04cos\nsystem\n(S'echo planted'\ntR.")  # a pickle payload where the record is
        for name, change in (("traversal", _traversal), ("stage2", _stage2)):
            path = os.path.join(root, name, "ep_ds_shim_checkpoint.json")
            with open(path) as handle:
                record = json.load(handle)
            change(record)
            with open(path, "w") as handle:
                json.dump(record, handle)
        os.makedirs(os.path.join(root, "..", "empty"), exist_ok=True)
        with open(os.path.join(root, "..", "a-file"), "w") as handle:
            handle.write("not a directory")
    dist.barrier()
    empty, a_file = os.path.join(root, "..", "empty"), os.path.join(root, "..", "a-file")
    cases = {
        "missing_dir": lambda: engine.load_checkpoint(os.path.join(root, "..", "nowhere")),
        "no_latest": lambda: engine.load_checkpoint(empty),
        "missing_tag": lambda: engine.load_checkpoint(root, tag="C"),
        "tag_per_rank": lambda: engine.load_checkpoint(root, tag="A" if rank == 0 else "B"),
        "partial_file": lambda: engine.load_checkpoint(root, tag="partial"),
        "swapped_file": lambda: engine.load_checkpoint(root, tag="swapped"),
        "no_record": lambda: engine.load_checkpoint(root, tag="unrecorded"),
        "pickle_record": lambda: engine.load_checkpoint(root, tag="notjson"),
        "traversal_record": lambda: engine.load_checkpoint(root, tag="traversal"),
        "stage2_record": lambda: engine.load_checkpoint(root, tag="stage2"),
        "no_optimizer_states": lambda: engine.load_checkpoint(root, load_optimizer_states=False),
        "save_tag_per_rank": lambda: engine.save_checkpoint(root, tag=f"rank{rank}"),
        "save_into_file": lambda: engine.save_checkpoint(a_file),
    }
    report["cases"] = {name: outcome(call) for name, call in cases.items()}
    report["listing"] = sorted(os.listdir(root))


def _traversal(record) -> None:
    record["ranks"][1]["files"]["optim_states"]["name"] = "../A/zero_pp_rank_1_mp_rank_00_optim_states.pt"


def _stage2(record) -> None:
    record["zero_stage"] = 2


def write(args, report) -> None:
    from ep_ds_shim import testing

    testing.write_report(args.report, report, rank=dist.get_rank())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("checkpoint_dir")
    parser.add_argument("report")
    parser.add_argument("--mode", choices=("save", "resume", "cases"), required=True)
    parser.add_argument("--ep-size", type=int, default=2)
    parser.add_argument("--save-at", default="2")
    parser.add_argument("--tag", default=None)
    parser.add_argument("--tag-per-rank", default=None)
    parser.add_argument("--kill", choices=KILL_POINTS, default=None)
    parser.add_argument("--victim", type=int, default=0)
    parser.add_argument("--module-only", action="store_true")
    parser.add_argument("--train-after", action="store_true")
    parser.add_argument("--param-groups", type=int, choices=(1, 2), default=1)
    parser.add_argument("--save-to", default=None)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()

    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    report = {"rank": dist.get_rank(), "world": dist.get_world_size()}
    try:
        engine, layout = build_engine(args.model, args.ep_size, param_groups=args.param_groups, bf16=args.bf16)
        report["layout"] = [layout.dp_size, layout.ep_size]
        {"save": save_mode, "resume": resume_mode, "cases": cases_mode}[args.mode](args, engine, layout, report)
    except Exception as error:  # noqa: BLE001 - recorded for the test
        report.update(raised=type(error).__name__, message=str(error), trace=traceback.format_exc()[-3000:])
    write(args, report)
    if report.get("raised") and args.mode != "resume":
        sys.exit(1)
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
