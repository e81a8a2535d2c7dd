"""The guard on `model.save_pretrained` of a DeepSpeed-ready EP model (set on the instance by
`deepspeed_ready.make_deepspeed_ready`)."""

from __future__ import annotations

import weakref

from ...errors import IncompleteSaveError
from ..record import record_of
from .single_process import shard_only_entries, single_process_save
from .stream import save_pretrained


class SavePretrainedGuard:
    """`model.save_pretrained` of a DeepSpeed-ready EP model (its weights are this rank's local shards, which
    transformers would write as if they were the whole model):

    - no ``state_dict``: the collective export `ep_ds_shim.save_pretrained` (every rank calls it, as transformers
      already requires for a model sharded at load time);
    - a ``state_dict`` with every expert (e.g. what the EP-aware engine consolidation gives rank 0 in the Trainer or
      accelerate): written by transformers on the calling rank alone, no barrier, so rank-0-only callers do not hang;
    - a ``state_dict`` holding one rank's expert shard, or ``distributed_checkpoint=True``: a clear error.
    """

    def __init__(self, model):
        self.model = weakref.ref(model)

    def __call__(self, save_directory, **kwargs):
        model = self.model()
        record = record_of(model)
        if kwargs.get("distributed_checkpoint"):
            raise IncompleteSaveError(
                "save_pretrained(distributed_checkpoint=True) of an EP model under DeepSpeed would write each rank's "
                "expert shard as if it were the whole tensor. Call ep_ds_shim.save_pretrained(engine, dir) on every "
                "rank for a standard checkpoint, or engine.save_checkpoint(dir) for a resumable one."
            )
        state_dict = kwargs.get("state_dict")
        if state_dict is None:
            kwargs.pop("is_main_process", None)  # the export decides who writes
            kwargs.pop("distributed_checkpoint", None)
            kwargs.pop("state_dict", None)
            return save_pretrained(model, save_directory, **kwargs)
        partial = shard_only_entries(state_dict, record)
        if partial:
            raise IncompleteSaveError(
                f"save_pretrained was given a state dict that holds only this rank's expert shard ({partial[0]}: "
                f"{state_dict[partial[0]].shape[0]} of {record.expert_rows[partial[0]]} experts); nothing was "
                "written. Call ep_ds_shim.save_pretrained(engine, dir) on every rank (or use ep_ds_shim.EPTrainer)."
            )
        with single_process_save(model):
            return type(model).save_pretrained(model, save_directory, **kwargs)
