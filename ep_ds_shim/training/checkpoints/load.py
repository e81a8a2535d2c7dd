"""`engine.load_checkpoint` of an EP engine: one call on every rank, in any DP x EP layout.

1. Every rank resolves the tag (its `latest`) and reads the checkpoint's JSON record; the ranks agree that they load
   the same tag, step and record. A missing directory, `latest` or tag, a save that never finished, a malformed
   record: the same error on every rank (DeepSpeed alone returns ``(None, None)`` for some of these).
2. The record is compared with this engine (`plan.py`): another ZeRO stage, model or optimizer, or an EP size that
   does not divide the experts, is refused on every rank, naming what differs.
3. In the layout that wrote it, each rank checks its own files' digests, then DeepSpeed's own load runs. In another
   layout, the checkpoint is converted to DeepSpeed's universal format (`universal.py`, or a conversion cached next
   to it is reused) and DeepSpeed's universal ZeRO-3 load runs, with the optimizer state, step count and LR
   scheduler.
4. Every rank checks that it resumed at the recorded step.

``load_module_only=True`` loads the weights only (no optimizer state, step or schedule), in any layout, through
the universal conversion: DeepSpeed's own ``load_module_only`` loads nothing under ZeRO-3.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from ...distributed import exchange
from ...errors import CheckpointIntegrityError, CheckpointLayoutError, EpShimError
from . import durable, manifest, universal
from .agree import agree, described, summary
from .plan import NATIVE, layout_of, plan
from .resolve import Problem, resolve

_ERRORS = {"integrity": CheckpointIntegrityError, "layout": CheckpointLayoutError}


def load_checkpoint(engine, original, record, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                    load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None, *,
                    conversion_dir=None):
    if not load_optimizer_states and not load_module_only:
        raise EpShimError(
            "load_checkpoint(load_optimizer_states=False) is not supported for EP engines: under ZeRO-3 DeepSpeed then "
            "rebuilds the weights with zero_to_fp32, which cannot read EP checkpoints. Load everything (the default) "
            "or the weights only (load_module_only=True).")
    here = layout_of(record)
    where = repr(os.fspath(load_dir))  # not the tag: ranks that were given different tags get the same error
    job = f"this job (dp={here['dp_size']} x ep={here['ep_size']}, world {here['world_size']})"
    tag, saved, tag_dir = _resolve_everywhere(load_dir, tag, where)
    problem, route = None, None
    try:
        route = plan(engine, record, saved, module_only=load_module_only)
    except Problem as refused:
        problem = refused.message
    except Exception as error:  # noqa: BLE001 - the same error on every rank
        problem = described(error)
    agree("checkpoint_plan", problem, what=f"load_checkpoint({where})", error=CheckpointLayoutError,
          prefix=(f"cannot resume {tag_dir} in {job} (a checkpoint of this model and ZeRO stage would resume in any "
                  "DP x EP layout: load_checkpoint converts it): "))

    kwargs = dict(load_module_strict=load_module_strict, load_optimizer_states=load_optimizer_states,
                  load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
                  custom_load_fn=custom_load_fn)
    if route == NATIVE:
        agree("checkpoint_files", _own_files_problem(saved, tag_dir), what=f"load_checkpoint({where})",
              error=CheckpointIntegrityError, prefix=f"cannot resume from {tag_dir}: ")
        with _universal_loading(engine, False):
            result = original(engine, load_dir, tag, **kwargs)
    else:
        if custom_load_fn is not None:
            raise EpShimError(f"{tag_dir} was written with dp={saved['layout']['dp_size']} x "
                              f"ep={saved['layout']['ep_size']}; resuming it in {job} goes through DeepSpeed's "
                              "universal checkpoint load, which does not call custom_load_fn")
        root = os.path.join(os.fspath(conversion_dir), tag) if conversion_dir is not None else tag_dir
        universal.ensure(saved, tag_dir, root)
        with _universal_loading(engine, True):
            result = original(engine, root, universal.FOLDER, **kwargs)
        if not load_module_only:
            _after_universal_load(engine, saved)
    if not load_module_only:
        _check_step(engine, saved, tag_dir, where)
    return result


def _resolve_everywhere(load_dir, tag, where: str) -> tuple[str, dict, str]:
    """Every rank resolves the tag and reads the record; all raise the same error unless they found the same
    checkpoint (tag, step, record digest). Returns (tag, record, tag directory)."""
    found = {"problem": None, "kind": None, "tag": None, "step": None, "record": None}
    saved = tag_dir = None
    try:
        tag, saved = resolve(load_dir, tag)
        tag_dir = os.path.join(os.fspath(load_dir), tag)
        found.update(tag=tag, step=saved["step"], record=universal.source_id(tag_dir))
    except Problem as problem:
        found.update(problem=problem.message, kind=problem.kind)
    except Exception as error:  # noqa: BLE001 - unreadable: the same error on every rank
        found.update(problem=described(error), kind="integrity")
    resolved = exchange("checkpoint_resolve", found, what=f"load_checkpoint({where})")
    _raise_problems(resolved, f"cannot resume from {where}: ")
    if len({(view["tag"], view["step"], view["record"]) for view in resolved.values()}) > 1:
        raise CheckpointIntegrityError(
            f"cannot resume from {where}: the ranks found different checkpoints (each reads `latest` itself): "
            + "; ".join(f"rank {rank}: tag {view['tag']!r}, step {view['step']}, record {view['record'][:12]}"
                        for rank, view in sorted(resolved.items())))
    return tag, saved, tag_dir


def _check_step(engine, saved: dict, tag_dir: str, where: str) -> None:
    """Every rank resumed at the step the record gives."""
    steps = exchange("checkpoint_step", {"step": int(engine.global_steps)}, what=f"load_checkpoint({where})")
    wrong = {rank: value["step"] for rank, value in steps.items() if value["step"] != saved["step"]}
    if wrong:
        raise CheckpointIntegrityError(f"resumed {tag_dir}, but ranks {sorted(wrong)} are at steps "
                                       f"{sorted(set(wrong.values()))}, not the recorded step {saved['step']}")


def _raise_problems(outcomes: dict, prefix: str) -> None:
    problems = {rank: outcome["problem"] for rank, outcome in outcomes.items() if outcome["problem"]}
    if problems:
        first = min(problems)
        raise _ERRORS[outcomes[first]["kind"]](prefix + summary(problems))


def _own_files_problem(saved: dict, tag_dir: str) -> str | None:
    """This rank's files are the ones the record describes (a partial or overwritten file is not)."""
    for described_file in manifest.rank_files(saved, dist.get_rank()).values():
        path = os.path.join(tag_dir, described_file["name"])
        if not os.path.isfile(path):
            return f"its file {path} is missing"
        digest = durable.digest_file(path)
        if digest != {"sha256": described_file["sha256"], "bytes": described_file["bytes"]}:
            size = (f"{digest['bytes']} bytes, {described_file['bytes']} recorded" if digest["bytes"] != described_file["bytes"]
                    else "the recorded size, another SHA-256")
            return (f"its file {path} is not the one the checkpoint's record describes ({size}): partial, damaged or "
                    "overwritten")
    return None


@contextlib.contextmanager
def _universal_loading(engine, on: bool):
    """DeepSpeed's `"checkpoint": {"load_universal": ...}` for one call, whatever the config says."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = on
    try:
        yield
    finally:
        config.load_universal_checkpoint = before


def _after_universal_load(engine, saved: dict) -> None:
    """Two things DeepSpeed 0.19's universal ZeRO-3 load does for a single parameter group only:
    - it gives every parameter group the hyperparameters of the first saved one (a Trainer's no-decay group would get
      weight decay): each group gets its own back, from the record;
    - it hands one step tensor to every sub-group's Adam state, which Adam then increments once per sub-group and
      step: each gets its own copy."""
    base = engine.optimizer.optimizer
    for group, saved_group in zip(base.param_groups, saved["optimizer"]["hyperparameters"]):
        for key, value in saved_group.items():
            if key in group:
                group[key] = tuple(value) if isinstance(group[key], tuple) and isinstance(value, list) else value
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
