"""`ep_ds_shim.save_pretrained`: the trained EP model as one standard checkpoint, streamed shard by shard and
written by every rank, into a temporary sibling of the target that replaces it only once complete and verified.

Every rank, in order (docs/saving.md):

1. plans the export on shapes alone (`plan.py`): entries, conversion units, shards of `max_shard_size`;
2. arrives (a store exchange with the `EP_DS_SHIM_TIMEOUT`, so a call made on some ranks only is an error naming
   the others, not a hang): global rank 0 has checked the target and made the sibling, with the config written by
   transformers' own `save_pretrained` (its distributed settings hidden); every rank agrees on target, options and
   plan, or every rank raises the same error, before anything is gathered;
3. checks it sees the sibling: if every rank does, shards are written by every rank in turn (shard i by rank
   i mod world), else by global rank 0 alone;
4. streams: round after round of one shard per writer, every rank takes part in gathering each entry (`gather.py`)
   and only the shard's writer keeps it; then each writer reverts and writes its shard (`write.py`). A writer holds
   one shard at a time;
5. reports its outcome; global rank 0 writes the index, re-reads every header against the plan and moves the export
   into place (`target.py`); every rank returns, or raises the same error.
"""

from __future__ import annotations

import collections
import os

import torch.distributed as dist

from ...distributed import exchange, initialised
from ...errors import EpShimError, ExportError, RankDisagreementError
from ...log import logger
from ..record import record_of, unwrap
from . import gather, plan as planning, target as targets, write
from .memory import TRIM_AFTER, return_freed_memory
from .plan import DEFAULT_MAX_SHARD_SIZE
from .outcome import WRITE_TIMEOUT
from .single_process import single_process_save

_DECIDED_HERE = ("state_dict", "is_main_process", "distributed_checkpoint")


def save_pretrained(engine_or_model, save_directory, *, max_shard_size=DEFAULT_MAX_SHARD_SIZE, variant=None,
                    save_original_format: bool = True, **save_pretrained_kwargs) -> None:
    """Write the whole EP model as a standard transformers checkpoint. Call on every rank.

    Args:
        engine_or_model: the DeepSpeed engine (or the model) of an EP model loaded inside `ep_zero3_compat`.
        save_directory: the target directory. Created if missing; if it holds a model already, its model files
            (weights, index, config, generation config) are replaced wholesale, other files are kept.
        max_shard_size: the largest safetensors file (default 5GB); also what a writing rank holds at most,
            plus one tensor (docs/saving.md).
        variant, save_original_format: as in transformers' `save_pretrained`.
        **save_pretrained_kwargs: passed to transformers' `save_pretrained` when it writes the config (e.g.
            ``token``); ``state_dict``, ``is_main_process`` and ``distributed_checkpoint`` are decided here.

    Plain single-process `from_pretrained(save_directory)` loads it, and so does an EP load of any EP size.
    """
    for name in _DECIDED_HERE:
        if name in save_pretrained_kwargs:
            raise TypeError(f"ep_ds_shim.save_pretrained decides {name!r} itself; do not pass it")
    if save_pretrained_kwargs.get("push_to_hub"):
        raise TypeError("ep_ds_shim.save_pretrained does not push; export, then upload the directory from one rank "
                        "with huggingface_hub.upload_folder(repo_id=..., folder_path=save_directory)")
    if not initialised():
        raise EpShimError("ep_ds_shim.save_pretrained needs the initialised process group of the training job")
    model = unwrap(engine_or_model)
    record = record_of(model)
    target = os.path.abspath(os.fspath(save_directory))
    what = f"ep_ds_shim.save_pretrained({os.fspath(save_directory)!r})"
    options = {"max_shard_size": str(max_shard_size), "variant": variant, "save_original_format": save_original_format,
               "other arguments": sorted(save_pretrained_kwargs)}

    plan, problem = None, None
    try:
        plan = planning.build_plan(model, record, max_shard_size=max_shard_size, variant=variant,
                                   save_original_format=save_original_format)
    except Exception as failure:  # noqa: BLE001 - shared with every rank at the arrival
        problem = f"planning the export: {type(failure).__name__}: {failure}"
    staging = _stage(model, target, problem, variant=variant, max_shard_size=max_shard_size,
                     save_original_format=save_original_format, **save_pretrained_kwargs)
    problem = problem or (staging.problem if staging else None)
    try:
        started = exchange("export/start", {"target": target, "options": options, "problem": problem,
                                            "plan": plan.digest() if plan else None,
                                            "token": staging.token if staging else None}, what=what)
        _refuse_on_every_rank(started, what)
        staging = staging or targets.Staging(target, started[0]["token"])
        visible = exchange("export/visible", {"visible": staging.visible_here()}, what=what)
        writers = _writers(visible, target)
        plan.assign_writers(writers)
        _log_plan(plan, writers, max_shard_size)
        error = _stream(model, record, plan, staging.path, width=len(writers),
                        save_original_format=save_original_format)
    except BaseException:
        if staging is not None and dist.get_rank() == 0:
            staging.discard()
        raise
    written = exchange("export/written", {"error": error}, what=what, timeout=WRITE_TIMEOUT)
    failed = {rank: outcome["error"] for rank, outcome in written.items() if outcome["error"]}
    error = _finish(staging, plan) if not failed and dist.get_rank() == 0 else None
    if failed and dist.get_rank() == 0:
        staging.discard()
    finished = exchange("export/finished", {"error": error}, what=what, timeout=WRITE_TIMEOUT)
    failed.update({rank: outcome["error"] for rank, outcome in finished.items() if outcome["error"]})
    if failed:
        rank, message = min(failed.items())
        raise ExportError(f"{what} failed on rank(s) {sorted(failed)}: {message}")


def _stage(model, target: str, problem, **save_kwargs):
    """Global rank 0: check the target, make the sibling and write the config into it (before any shard: the
    config-only `save_pretrained` clears shard-named files it did not write). Returns the staging (carrying
    a problem instead if any), or None on the other ranks."""
    if dist.get_rank() != 0:
        return None
    staging = targets.Staging(target)
    staging.problem = problem or targets.problem_with(target)
    if staging.problem is None:
        try:
            staging.create()
        except OSError as failure:
            staging.problem = f"{target} cannot be written: {type(failure).__name__}: {failure}"
    if staging.problem is None:
        try:
            write_config(model, staging.path, **save_kwargs)
        except Exception as failure:  # noqa: BLE001 - shared with every rank at the arrival
            staging.problem = f"transformers' save_pretrained could not write the config: {type(failure).__name__}: {failure}"
    if staging.problem is not None:
        staging.discard()
    return staging


def write_config(model, directory: str, **save_kwargs) -> None:
    """The config, generation config and any custom code, as transformers' own `save_pretrained` writes them for this
    model (dtype, architectures; no distributed settings), by a call with an empty state dict."""
    from transformers.utils import logging

    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # its "Writing model shards" bar would count no shards
    try:
        with single_process_save(model):
            type(model).save_pretrained(model, directory, state_dict={}, is_main_process=True, **save_kwargs)
    finally:
        if bar:
            logging.enable_progress_bar()
    stray = [name for name in os.listdir(directory) if targets.is_model_file(name) and name not in targets.CONFIG_FILES]
    if stray:
        raise ExportError(f"transformers' save_pretrained wrote weights files {stray} for an empty state dict")


def _refuse_on_every_rank(started: dict[int, dict], what: str) -> None:
    problems = {rank: payload["problem"] for rank, payload in started.items() if payload["problem"]}
    if problems:
        rank, message = min(problems.items())
        raise ExportError(f"{what}: nothing was gathered or written ({message}"
                          + (f"; on rank {rank}" if rank else "") + ")")
    for field in ("target", "options", "plan"):
        values: dict[str, list[int]] = {}
        for rank, payload in sorted(started.items()):
            values.setdefault(repr(payload[field]), []).append(rank)
        if len(values) > 1:
            described = "; ".join(f"ranks {ranks}: {value}" for value, ranks in values.items())
            raise RankDisagreementError(
                f"{what}: the ranks disagree on the export's {field} ({described}); nothing was gathered or written. "
                "Every rank must export the same model to the same directory with the same arguments."
            )


def _writers(visible: dict[int, dict], target: str) -> list[int]:
    blind = [rank for rank, payload in sorted(visible.items()) if not payload["visible"]]
    if not blind:
        return sorted(visible)
    logger.info(f"ep_ds_shim.save_pretrained: ranks {blind} do not see the directory global rank 0 writes into "
                f"(next to {target}): not a shared filesystem, so global rank 0 writes every shard")
    return [0]


def _log_plan(plan, writers: list[int], max_shard_size) -> None:
    for note in plan.notes:
        (logger.warning if "the whole model" in note else logger.info)(f"ep_ds_shim.save_pretrained: {note}")
    routes = collections.Counter(entry.route for entry in plan.entries.values())
    logger.info(f"ep_ds_shim.save_pretrained: {len(plan.shards)} shard(s) of at most {max_shard_size} (largest "
                f"conversion unit {plan.largest_unit()} bytes), written by rank(s) {writers}; entries by route: "
                f"{dict(sorted(routes.items()))}")
    if routes.get("gathered"):
        logger.warning(f"ep_ds_shim.save_pretrained: {routes['gathered']} entries are gathered collectively (ZeRO-3 "
                       "partitions offloaded to NVMe or quantized, or DTensors not split by experts): each needs "
                       "twice its size on every rank for a moment")


def _stream(model, record, plan, directory: str, *, width: int, save_original_format: bool) -> str | None:
    """Every shard, round after round (one shard per writer each); returns this rank's write error, if any (it keeps
    taking part in the transfers after one, so no other rank is left waiting).

    A writer holds its shard, whole, then converts it unit by unit (each unit's sources released once converted) and
    writes it: at most the shard plus one unit at a time."""
    tensors = model.state_dict(keep_vars=True)
    rank = dist.get_rank()
    error = None
    tags = {name: tag for tag, name in enumerate(plan.entries)}
    # what planning left: transformers' converters, deep-copied for every conversion, sit in reference cycles
    return_freed_memory(collect=True)
    for start in range(0, len(plan.shards), width):
        shards = plan.shards[start:start + width]
        held = gather.bring([(name, tensors[name], plan.entries[name], shard.writer, tags[name])
                             for shard in shards for unit in shard.units for name in unit.names], record)
        mine = next((shard for shard in shards if shard.writer == rank), None)
        if mine is not None and error is None:
            try:
                outputs = {}
                for unit in mine.units:
                    outputs.update(write.convert(model, unit, {name: held.pop(name) for name in unit.names},
                                                 save_original_format=save_original_format))
                    if unit.nbytes >= TRIM_AFTER:
                        return_freed_memory()  # the unit's sources, if the conversion copied them
                write.write_shard(mine, outputs, directory)
            except Exception as failure:  # noqa: BLE001 - reported to every rank after the transfers
                error = f"rank {rank} writing {mine.filename}: {type(failure).__name__}: {failure}"
            outputs = None
        held.clear()
        return_freed_memory()
    return error


def _finish(staging, plan) -> str | None:
    """Global rank 0, once every shard is written: the index, the verification, the move into place."""
    try:
        if plan.index_name is not None:
            write.write_index(staging.path, plan)
        write.verify(staging.path, plan)
    except Exception as failure:  # noqa: BLE001 - shared with every rank
        staging.discard()
        return f"{type(failure).__name__}: {failure}; the target was not touched"
    try:
        staging.commit()
    except Exception as failure:  # noqa: BLE001 - shared with every rank
        return (f"moving the verified export into place: {type(failure).__name__}: {failure}. The complete export "
                f"is in {staging.path}; the target holds no model that claims to be complete")
    return None
