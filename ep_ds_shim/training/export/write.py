"""Converting and writing one shard, and reading back what was written.

Each conversion unit, whole, goes through transformers' own `revert_weight_conversion` as soon as its writer has
gathered it; the shard's converted tensors go through safetensors' own `save_file`. The verification re-reads
safetensors headers only.
"""

from __future__ import annotations

import json
import os

from ...errors import ExportError
from .plan import ExportPlan, Shard, Spec, Unit


def convert(model, unit: Unit, tensors: dict, *, save_original_format: bool) -> dict:
    """One unit's entries (whole), converted to the release's key layout by transformers' own
    `revert_weight_conversion`, as its `save_pretrained` reverts an offloaded model shard by shard (the plan checked
    that the unit converts alone). Empties `tensors`, so its sources are freed once converted if the conversion
    copied them."""
    from transformers.core_model_loading import revert_weight_conversion

    part = dict(tensors)
    tensors.clear()
    return revert_weight_conversion(model, part) if save_original_format else part


def write_shard(shard: Shard, outputs: dict, directory: str) -> None:
    """Write `shard`'s converted tensors with safetensors' own `save_file` (from the tensors' memory, without
    copying them); empties `outputs`."""
    from safetensors.torch import save_file

    for key in list(outputs):
        # safetensors needs contiguous tensors; a converted view that is not (a transpose) is copied one at a time,
        # and its source is freed as soon as its last view is replaced
        outputs[key] = outputs[key].contiguous()
    _check(shard.filename, {key: (tuple(value.shape), value.dtype) for key, value in outputs.items()}, shard.outputs())
    path = os.path.join(directory, shard.filename)
    save_file(outputs, path, metadata={"format": "pt"})
    outputs.clear()
    fsync_file(path)


def read_header(path: str) -> dict[str, Spec]:
    """{key: (shape, dtype)} from a safetensors file's header (no tensor data is read)."""
    from safetensors import safe_open
    from safetensors.torch import _TYPES

    with safe_open(path, framework="pt") as handle:
        return {key: (tuple(handle.get_slice(key).get_shape()), _TYPES[handle.get_slice(key).get_dtype()])
                for key in handle.keys()}


def verify(directory: str, plan: ExportPlan) -> None:
    """Every shard holds exactly its planned keys, shapes and dtypes; the index (when sharded) maps every key to the
    file that holds it and states the exported model's sizes. Raises `ExportError` naming the first difference."""
    for shard in plan.shards:
        path = os.path.join(directory, shard.filename)
        if not os.path.isfile(path):
            raise ExportError(f"verification: {shard.filename} is missing from {directory}")
        _check(shard.filename, read_header(path), shard.outputs())
    if plan.index_name is not None:
        with open(os.path.join(directory, plan.index_name)) as handle:
            index = json.load(handle)
        if index != plan.index():
            raise ExportError(f"verification: {plan.index_name} does not match the planned index")


def _check(filename: str, found: dict[str, Spec], wanted: dict[str, Spec]) -> None:
    if found == wanted:
        return
    missing, extra = sorted(set(wanted) - set(found)), sorted(set(found) - set(wanted))
    differ = sorted(key for key in set(found) & set(wanted) if found[key] != wanted[key])
    raise ExportError(
        f"verification of {filename}: it does not hold what the model's export must hold (missing {missing[:3]}, "
        f"unexpected {extra[:3]}, other shape or dtype {[(k, found[k], wanted[k]) for k in differ[:3]]}); nothing "
        "was moved into the target directory."
    )


def write_index(directory: str, plan: ExportPlan) -> None:
    """The index as transformers writes it (indented, sorted keys, trailing newline)."""
    path = os.path.join(directory, plan.index_name)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(plan.index(), indent=2, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def fsync_file(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
