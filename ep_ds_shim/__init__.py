"""ep-ds-shim: load Mixture-of-Experts models with expert parallelism while DeepSpeed ZeRO-3 is active, and
train them correctly, on released transformers.

    from ep_ds_shim import ep_zero3_compat
    with ep_zero3_compat():
        model = AutoModelForCausalLM.from_pretrained(path, **ep_from_pretrained_kwargs(path, ep_size=2))
"""

from ._context import ep_zero3_compat
from ._releases import VERIFIED_DEEPSPEED, VERIFIED_TRANSFORMERS
from .errors import (
    DeepSpeedGroupsError,
    EPRequestError,
    EpShimError,
    ExpertIntegrityError,
    RestoreError,
    TargetDriftError,
    UnsupportedReleaseError,
)
from .deepspeed_groups import supply_deepspeed_groups
from .layout import DPxEPGroups, DPxEPLayout
from .spelling import ep_from_pretrained_kwargs
from .zero3 import check_deepspeed_groups, initialize, verify_expert_integrity

__version__ = "0.1.0"

__all__ = [
    "DPxEPGroups",
    "DPxEPLayout",
    "DeepSpeedGroupsError",
    "EPRequestError",
    "EpShimError",
    "ExpertIntegrityError",
    "RestoreError",
    "TargetDriftError",
    "UnsupportedReleaseError",
    "VERIFIED_DEEPSPEED",
    "VERIFIED_TRANSFORMERS",
    "check_deepspeed_groups",
    "ep_from_pretrained_kwargs",
    "ep_zero3_compat",
    "initialize",
    "supply_deepspeed_groups",
    "verify_expert_integrity",
]
