"""transformers' own `save_pretrained` on one rank, for a model whose distributed settings must not make it
collective."""

from __future__ import annotations

import contextlib

from ..record import EPModelRecord

# What makes transformers' `save_pretrained` treat a model as distributed: the config's `distributed_config` (5.15+:
# gathers, distributed checkpoints, a closing world barrier) and the model's `_tp_size` (5.6-5.14: gathers).
_DISTRIBUTED_MARKERS = (("config", "distributed_config"), ("model", "_tp_size"))


@contextlib.contextmanager
def single_process_save(model):
    """While `save_pretrained` writes a state dict that is already whole, hide what makes it distributed, so it takes
    its plain single-process path on the one rank that calls it."""
    owners = {"config": model.config, "model": model}
    hidden = {(owner, name): vars(owners[owner]).pop(name) for owner, name in _DISTRIBUTED_MARKERS
              if name in vars(owners[owner])}
    try:
        yield
    finally:
        for (owner, name), value in hidden.items():
            setattr(owners[owner], name, value)


def shard_only_entries(state_dict: dict, record: EPModelRecord) -> list[str]:
    """The expert entries of `state_dict` that hold only one rank's shard instead of every expert."""
    return [
        name for name, value in state_dict.items()
        if name in record.expert_rows and getattr(value, "ndim", 0) > 0 and value.shape[0] != record.expert_rows[name]
    ]
