"""The `from_pretrained` scope: decide whether a load is an EP load, check it before any collective runs, and hand
the loaded model to the training side (one hook, `TRAINING_HOOK`).

`from_pretrained` is the only place that sees `distributed_config` / `device_mesh`; the gates below it are
called positionally. So the entry wrapper records the request in a ContextVar (`context.current_load`) and the
gates read it from there.
"""

from __future__ import annotations

import importlib
import warnings

from transformers.distributed import DistributedConfig
from transformers.integrations import deepspeed as hf_deepspeed

from ..distributed import initialised
from ..errors import EPRequestError
from ..log import logger
from ..patching.targets import Target
from ..releases.lines import ReleaseLine, release_line_for
from .. import rank_agreement
from . import legacy_spelling
from .legacy_spelling import legacy_flag_without_ep, message
from .loaded_model import check_loaded_model
from .request import validate_request
from .context import LoadRecord, loading, translating_upstream_spelling
from .zero3_question import zero3_signalled
from ..releases.support import transformers_version

TARGET = Target(
    "transformers.modeling_utils:PreTrainedModel",
    "from_pretrained",
    "classmethod",
    leading_params=("cls", "pretrained_model_name_or_path", "model_args"),
)
NAME = "from_pretrained"

# The one way from loading into training: at the end of every EP load, record the model (EP group, expert
# fingerprints), attach its instance guards and, when DeepSpeed is signalled, make it DeepSpeed-ready. Resolved on
# the first EP load, so importing the loading block imports no training module.
TRAINING_HOOK = "ep_ds_shim.training.deepspeed_ready:adopt_ep_load"


def _normalised(distributed_config):
    """A `distributed_config` given as a dict, as the `DistributedConfig` transformers will build from it."""
    if isinstance(distributed_config, dict):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its own FutureWarning is transformers' to give, when it builds it
            return DistributedConfig.from_dict(distributed_config)
    return distributed_config


def from_pretrained(wrapped, cls, args, kwargs):
    """The entry wrapper (wrapt signature; `cls` is the class the classmethod was called on)."""
    line = release_line_for(transformers_version())
    requested = _normalised(kwargs.get("distributed_config"))
    zero3 = zero3_signalled()
    if zero3:  # upstream's own spellings, before any weight is read
        kwargs = _upstream_spelling(cls, args, kwargs, requested, line)
        requested = _normalised(kwargs.get("distributed_config"))
    legacy = line.legacy_flag_silently_off and legacy_flag_without_ep(requested)
    ep_size = line.spelling.requested_ep_size(requested, kwargs)
    record = LoadRecord(cls.__name__, ep_size, zero3)
    if legacy:
        warnings.warn(message("loads WITHOUT expert parallelism"), UserWarning, stacklevel=3)
    if ep_size is None or ep_size < 2:
        with loading(record):
            return wrapped(*args, **kwargs)

    validate_request(cls, args, kwargs, ep_size, line)
    # Before any collective of the load: every rank must ask for the same load, or all of them hear why.
    rank_agreement.check_load_request(cls.__name__, ep_size, kwargs)
    with loading(record):
        result = wrapped(*args, **kwargs)
    model = result[0] if isinstance(result, tuple) else result
    _after_ep_load(model, record, line)
    return result


def _after_ep_load(model, record: LoadRecord, line: ReleaseLine) -> None:
    check_loaded_model(model, record.ep_size)
    # DeepSpeed signalled (any ZeRO stage): it will take this model, so the hook makes it DeepSpeed-ready now and
    # arms the first-forward guard, which also catches the upstream recipe (no DP x EP groups). Without DeepSpeed
    # signalled the model stays exactly what transformers returned until the library hands it to DeepSpeed.
    _training_hook()(model, record.ep_size, line, deepspeed_signalled=hf_deepspeed.deepspeed_config() is not None)
    where = "under ZeRO-3 took the standard path at: " + (", ".join(record.gates_taken) or "no gate") if record.zero3 \
        else "(ZeRO-3 not signalled)"
    logger.info(f"ep_ds_shim: EP load of {record.model_class} (ep_size={record.ep_size}) {where}")


def _training_hook():
    module, _, name = TRAINING_HOOK.partition(":")
    return getattr(importlib.import_module(module), name)


def _upstream_spelling(cls, args, kwargs: dict, requested, line: ReleaseLine) -> dict:
    """Under ZeRO-3: upstream's EP spellings that this block cannot load as asked, translated to this release's EP
    request (dense layers whole; `legacy_spelling`), or refused with the one-line fix when the block says so."""
    translate = translating_upstream_spelling()
    if line.legacy_flag_silently_off and legacy_flag_without_ep(requested):
        ep_size = legacy_spelling.legacy_ep_size(kwargs)
        if not translate:
            raise EPRequestError(message("is refused under ZeRO-3"))
        if ep_size < 2:
            return kwargs
        _say(f"ep_ds_shim: translated DistributedConfig(enable_expert_parallel=True) to this release's EP spelling "
             f"(ep_size={ep_size}), which would otherwise load {cls.__name__} without expert parallelism.")
        return legacy_spelling.translated(cls, args, kwargs, ep_size)
    if legacy_spelling.dense_tp_request(requested):
        ep_size, tp_size = requested.ep_size, requested.tp_size
        if not translate:
            raise EPRequestError(legacy_spelling.dense_tp_message(cls.__name__, ep_size, tp_size, translated_=False))
        _say(legacy_spelling.dense_tp_message(cls.__name__, ep_size, tp_size, translated_=True))
        return legacy_spelling.translated(cls, args, kwargs, ep_size)
    return kwargs


def _say(text: str) -> None:
    """A translation changes what the user's code asked for: say it once per process, on the first rank."""
    import torch.distributed as dist

    if not initialised() or dist.get_rank() == 0:
        logger.warning_once(text)
