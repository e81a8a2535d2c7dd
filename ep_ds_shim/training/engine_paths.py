"""The save and checkpoint paths of one DeepSpeed engine that holds an EP model, made EP-aware.

Everything here is an attribute of that engine instance; no class and nothing global is patched.

- `_zero3_consolidated_16bit_state_dict` gathers every EP rank's experts as well (DeepSpeed's own gathers each
  parameter over its partition group only, and no group spans the EP ranks' different experts).
  `save_16bit_model`, accelerate's `get_state_dict` / `save_model` and the Trainer's `save_model` all go through it.
- `save_checkpoint` puts a checkpoint in place only once every rank's files are on disk, with a JSON record of it;
  `load_checkpoint` checks what it loads on every rank and resumes in any DP x EP layout (`checkpoints/`). Also what
  accelerate's `save_state` / `load_state` and the Trainer's checkpoints and `resume_from_checkpoint` call.
"""

from __future__ import annotations

import functools

from .checkpoints import load_engine_checkpoint, save_engine_checkpoint
from .export import gather_full_state_dict
from .record import EPModelRecord, unwrap


def attach(engine, record: EPModelRecord) -> None:
    model = unwrap(engine)
    engine._zero3_consolidated_16bit_state_dict = functools.partial(_consolidated, model)
    engine.save_checkpoint = functools.partial(save_engine_checkpoint, engine, type(engine).save_checkpoint, record)
    engine.load_checkpoint = functools.partial(load_engine_checkpoint, engine, type(engine).load_checkpoint, record)


def _consolidated(model, exclude_frozen_parameters: bool = False):
    return gather_full_state_dict(model, exclude_frozen_parameters=exclude_frozen_parameters)
