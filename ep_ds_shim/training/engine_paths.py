"""The save and checkpoint paths of one DeepSpeed engine that holds an EP model, made EP-aware.

Everything here is an attribute of that engine (or model) instance; no class and nothing global is patched.

- ZeRO-3: `_zero3_consolidated_16bit_state_dict` gathers every EP rank's experts as well (DeepSpeed's own gathers
  only over the data-parallel group, which never spans EP ranks). `save_16bit_model`, accelerate's
  `get_state_dict` / `save_model` and the Trainer's `save_model` all go through it.
- ZeRO 0-2: `save_16bit_model` writes the gathered model (DeepSpeed's own code, given the full state dict), and
  `model.state_dict()` (what accelerate's `get_state_dict` reads at those stages) refuses to hand out one rank's
  experts as the model, outside the library's own per-rank uses.
- `save_checkpoint` records the DP x EP layout in the checkpoint; `load_checkpoint` refuses another layout on every
  rank with one clear error (`checkpoints.py`). Also used by accelerate's `save_state` / `load_state` and the
  Trainer's checkpoints and `resume_from_checkpoint`.
"""

from __future__ import annotations

import functools

from ..errors import IncompleteSaveError
from . import checkpoints
from .export import agree_on_outcome, allow_local_state_dict, gather_full_state_dict, local_state_dict_allowed
from .record import EPModelRecord, unwrap


def attach(engine, record: EPModelRecord) -> None:
    model = unwrap(engine)
    if engine.zero_optimization_stage() == 3:
        engine._zero3_consolidated_16bit_state_dict = functools.partial(_consolidated, model)
    else:
        engine.save_16bit_model = functools.partial(_save_16bit_model, engine, type(engine).save_16bit_model, model)
        if record.state_dict_guard is None:
            record.state_dict_guard = model.register_state_dict_post_hook(_refuse_local_state_dict)
    engine.save_checkpoint = functools.partial(_save_checkpoint, engine, type(engine).save_checkpoint, record)
    engine.load_checkpoint = functools.partial(_load_checkpoint, engine, type(engine).load_checkpoint, record)


def _consolidated(model, exclude_frozen_parameters: bool = False):
    return gather_full_state_dict(model, exclude_frozen_parameters=exclude_frozen_parameters)


def _save_16bit_model(engine, original, model, save_dir, save_filename="pytorch_model.bin",
                      exclude_frozen_parameters=False):
    """DeepSpeed's own `save_16bit_model`, with the gathered model where it reads this rank's module state."""
    full = gather_full_state_dict(model, exclude_frozen_parameters=exclude_frozen_parameters)
    engine.module_state_dict = lambda *args, **kwargs: full
    error = None
    try:
        saved = original(engine, save_dir, save_filename, exclude_frozen_parameters)
    except Exception as failure:  # noqa: BLE001 - shared with every rank below
        error, saved = f"{type(failure).__name__}: {failure}", False
    finally:
        del engine.module_state_dict
    agree_on_outcome(error, f"save_16bit_model({save_dir!r})")
    return saved


def _refuse_local_state_dict(module, state_dict, prefix, local_metadata):
    if not local_state_dict_allowed.get():
        raise IncompleteSaveError(
            f"{type(module).__name__}.state_dict() under DeepSpeed ZeRO 0-2 holds only this rank's experts, and a "
            "checkpoint written from it would silently miss the others (accelerate's get_state_dict / save_model "
            "read it at these stages). For a standard checkpoint call ep_ds_shim.save_pretrained(engine, dir) on "
            "every rank; for a resumable one, engine.save_checkpoint(dir) / accelerator.save_state(dir)."
        )


def _save_checkpoint(engine, original, record, save_dir, tag=None, client_state=None, *args, **kwargs):
    client_state = dict(client_state or {}, **{checkpoints.RECORD_KEY: checkpoints.layout_record(engine, record)})
    with allow_local_state_dict():  # its per-EP-rank files are meant to hold this rank's experts
        return original(engine, save_dir, tag, client_state, *args, **kwargs)


def _load_checkpoint(engine, original, record, load_dir, tag=None, *args, **kwargs):
    checkpoints.check_resume(engine, record, load_dir, tag, load_module_only=bool(kwargs.get("load_module_only")))
    return original(engine, load_dir, tag, *args, **kwargs)
