"""ep-ds-shim: load Mixture-of-Experts models with expert parallelism while DeepSpeed ZeRO-3 is active, train them
correctly, and save, resume and export the result, on released transformers.

    import ep_ds_shim
    layout = ep_ds_shim.DPxEPLayout(ep_size=2)
    with ep_ds_shim.ep_zero3_compat():
        model = AutoModelForCausalLM.from_pretrained(path, **layout.from_pretrained_kwargs(path))
    engine, *_ = ep_ds_shim.initialize(model=model, layout=layout, optimizer=opt, config=ds_config)
    ep_ds_shim.save_pretrained(engine, "out/")

The public names are resolved on first use: `import ep_ds_shim` (and `python -m ep_ds_shim doctor`) stays cheap
and works even when torch, transformers, DeepSpeed or wrapt is broken, so the doctor can say which one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import __version__

# public name -> the module that defines it
_PUBLIC = {
    "ep_zero3_compat": "ep_ds_shim.loading.block",
    "ep_from_pretrained_kwargs": "ep_ds_shim.releases.ep_request",
    "VERIFIED_TRANSFORMERS": "ep_ds_shim.releases.support",
    "VERIFIED_DEEPSPEED": "ep_ds_shim.releases.support",
    "DPxEPLayout": "ep_ds_shim.training.layout",
    "initialize": "ep_ds_shim.training.deepspeed_handover",
    "supply_deepspeed_groups": "ep_ds_shim.training.launcher_groups",
    "check_deepspeed_groups": "ep_ds_shim.training.guard",
    "verify_expert_integrity": "ep_ds_shim.training.guard",
    "save_pretrained": "ep_ds_shim.training.export",
    "load_checkpoint": "ep_ds_shim.training.checkpoints",
    "EPTrainer": "ep_ds_shim.training.trainer",
    "EPTrainerMixin": "ep_ds_shim.training.trainer",
    **{name: "ep_ds_shim.errors" for name in (
        "EpShimError", "UnsupportedReleaseError", "TargetDriftError", "EPRequestError", "DeepSpeedGroupsError",
        "ExpertIntegrityError", "RestoreError", "ScopeError", "RankDisagreementError", "CollectiveTimeoutError",
        "RankExitedError", "ExportError", "IncompleteSaveError", "CheckpointLayoutError", "CheckpointIntegrityError",
    )},
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'ep_ds_shim' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names above are resolved lazily
    from .errors import (  # noqa: F401
        CheckpointIntegrityError,
        CheckpointLayoutError,
        CollectiveTimeoutError,
        DeepSpeedGroupsError,
        EPRequestError,
        EpShimError,
        ExpertIntegrityError,
        ExportError,
        IncompleteSaveError,
        RankDisagreementError,
        RankExitedError,
        RestoreError,
        ScopeError,
        TargetDriftError,
        UnsupportedReleaseError,
    )
    from .loading.block import ep_zero3_compat  # noqa: F401
    from .releases.ep_request import ep_from_pretrained_kwargs  # noqa: F401
    from .releases.support import VERIFIED_DEEPSPEED, VERIFIED_TRANSFORMERS  # noqa: F401
    from .training.checkpoints import load_checkpoint  # noqa: F401
    from .training.export import save_pretrained  # noqa: F401
    from .training.launcher_groups import supply_deepspeed_groups  # noqa: F401
    from .training.guard import check_deepspeed_groups, verify_expert_integrity  # noqa: F401
    from .training.deepspeed_handover import initialize  # noqa: F401
    from .training.layout import DPxEPLayout  # noqa: F401
    from .training.trainer import EPTrainer, EPTrainerMixin  # noqa: F401
