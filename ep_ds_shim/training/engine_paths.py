"""The save and checkpoint paths of one DeepSpeed engine that holds an EP model, made EP-aware.

Everything here is an attribute of that engine instance; no class and nothing global is patched.

- `_zero3_consolidated_16bit_state_dict` gathers every EP rank's experts as well (DeepSpeed's own gathers each
  parameter over its partition group only, and no group spans the EP ranks' different experts).
  `save_16bit_model`, accelerate's `get_state_dict` / `save_model` and the Trainer's `save_model` all go through it.
- `save_checkpoint` records the DP x EP layout in the checkpoint; `load_checkpoint` refuses another layout on every
  rank with one clear error (`checkpoints.py`). Also used by accelerate's `save_state` / `load_state` and the
  Trainer's checkpoints and `resume_from_checkpoint`.
"""

from __future__ import annotations

import functools

from . import checkpoints
from .export import gather_full_state_dict
from .record import EPModelRecord, unwrap


def attach(engine, record: EPModelRecord) -> None:
    model = unwrap(engine)
    engine._zero3_consolidated_16bit_state_dict = functools.partial(_consolidated, model)
    engine.save_checkpoint = functools.partial(_save_checkpoint, engine, type(engine).save_checkpoint, record)
    engine.load_checkpoint = functools.partial(_load_checkpoint, engine, type(engine).load_checkpoint, record)


def _consolidated(model, exclude_frozen_parameters: bool = False):
    return gather_full_state_dict(model, exclude_frozen_parameters=exclude_frozen_parameters)


def _save_checkpoint(engine, original, record, save_dir, tag=None, client_state=None, *args, **kwargs):
    client_state = dict(client_state or {}, **{checkpoints.RECORD_KEY: checkpoints.layout_record(engine, record)})
    return original(engine, save_dir, tag, client_state, *args, **kwargs)


def _load_checkpoint(engine, original, record, load_dir, tag=None, *args, **kwargs):
    checkpoints.check_resume(engine, record, load_dir, tag, load_module_only=bool(kwargs.get("load_module_only")))
    return original(engine, load_dir, tag, *args, **kwargs)
