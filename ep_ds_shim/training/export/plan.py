"""What the export writes, decided before any data moves, on shapes alone and identically on every rank.

- The entries: the model's state dict without tied duplicates or `_keys_to_ignore_on_save` (transformers' own
  `remove_tied_weights_from_state_dict` decides which name of a tied pair is kept), each with its *whole* shape
  (every expert, every ZeRO-3 partition).
- The conversion units: groups of entries that transformers' reverse weight conversion (`revert_weight_conversion`,
  the key layout the release writes, e.g. mixtral's `block_sparse_moe.experts.N.w1`) turns into output tensors
  together. It runs on meta tensors: once on the whole state dict (the outputs the export must hold, with their
  shapes and dtypes), then on each entry alone. An entry whose outputs alone are exactly its part of the whole is a
  unit of its own (every MoE family's experts on 5.6-5.24); entries that only convert together (e.g. a fused qkv
  written from q, k and v) are grouped by layer and checked the same way; if that still does not reproduce the
  whole, everything is one unit (logged: the writer then holds the whole model).
- The shards: the units, split by `max_shard_size` with huggingface_hub's own splitter (the one transformers'
  `save_pretrained` uses), so a unit never spans two files, and each file's outputs, shapes and dtypes are known
  before it is written (what the verification compares the written headers with).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor import Shard as RowsSplit  # torch's placement (not this module's Shard: a file)

from ...errors import ExportError
from ..record import EPModelRecord

# transformers 4.x's default and the hub's convention; a writer holds at most one shard (docs/saving.md)
DEFAULT_MAX_SHARD_SIZE = "5GB"

Spec = tuple[tuple[int, ...], torch.dtype]


@dataclass(frozen=True)
class Entry:
    """One state-dict entry as the export sees it."""

    name: str
    shape: tuple[int, ...]  # whole: every expert, every ZeRO-3 partition
    dtype: torch.dtype
    route: str  # how it reaches its writer (`gather.py`)
    expert_shard: bool  # once read locally, this rank holds only its EP rank's rows

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class Unit:
    """Entries the reverse conversion turns into outputs together, and those outputs."""

    names: tuple[str, ...]
    outputs: dict[str, Spec]
    nbytes: int


@dataclass
class Shard:
    filename: str
    units: tuple[Unit, ...]
    writer: int = 0  # the global rank that writes it (`assign_writers`)

    def outputs(self) -> dict[str, Spec]:
        return {key: spec for unit in self.units for key, spec in unit.outputs.items()}

    @property
    def nbytes(self) -> int:
        return sum(unit.nbytes for unit in self.units)


@dataclass
class ExportPlan:
    entries: dict[str, Entry]
    shards: list[Shard]
    index_name: str | None  # the index file when there is more than one shard
    total_size: int
    total_parameters: int
    notes: list[str] = field(default_factory=list)  # fallbacks taken, for the log

    def outputs(self) -> dict[str, Spec]:
        return {key: spec for shard in self.shards for key, spec in shard.outputs().items()}

    def weight_map(self) -> dict[str, str]:
        return {key: shard.filename for shard in self.shards for key in shard.outputs()}

    def index(self) -> dict:
        """The index transformers writes for a sharded save."""
        return {"metadata": {"total_parameters": self.total_parameters, "total_size": self.total_size},
                "weight_map": self.weight_map()}

    def largest_unit(self) -> int:
        return max((unit.nbytes for shard in self.shards for unit in shard.units), default=0)

    def digest(self) -> str:
        """The same on every rank that holds the same model and options."""
        described = [[shard.filename, [[list(unit.names), sorted((k, list(s), str(d)) for k, (s, d) in unit.outputs.items())]
                                       for unit in shard.units]] for shard in self.shards]
        routes = [[entry.name, entry.route, entry.expert_shard] for entry in self.entries.values()]
        text = json.dumps([described, routes, self.index_name, self.total_parameters], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def assign_writers(self, writers: list[int]) -> None:
        """Shard i is written by writers[i % len(writers)]: each round of len(writers) shards, one per writer."""
        for number, shard in enumerate(self.shards):
            shard.writer = writers[number % len(writers)]


def build_plan(model, record: EPModelRecord, *, max_shard_size, variant: str | None,
               save_original_format: bool) -> ExportPlan:
    from huggingface_hub import split_state_dict_into_shards_factory
    from transformers.modeling_utils import _add_variant
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    check_consecutive_ep_groups(record)
    tensors = model.state_dict(keep_vars=True)
    entries = {name: entry_of(name, tensors[name], record) for name in saved_names(model, tensors)}
    metas = {name: torch.empty(entry.shape, dtype=entry.dtype, device="meta") for name, entry in entries.items()}
    notes: list[str] = []
    if save_original_format:
        units = conversion_units(model, metas, entries, notes)
    else:
        units = [Unit((name,), {name: (entry.shape, entry.dtype)}, entry.nbytes) for name, entry in entries.items()]
    weights_name = _add_variant(SAFE_WEIGHTS_NAME, variant)
    split = split_state_dict_into_shards_factory(
        {unit.names[0]: unit for unit in units}, get_storage_size=lambda unit: unit.nbytes,
        filename_pattern=weights_name.replace(".safetensors", "{suffix}.safetensors"), max_shard_size=max_shard_size)
    by_first = {unit.names[0]: unit for unit in units}
    shards = [Shard(filename, tuple(by_first[key] for key in keys)) for filename, keys in split.filename_to_tensors.items()]
    total_parameters = sum(math.prod(whole_shape(name, param, record)) for name, param in model.named_parameters())
    return ExportPlan(entries, shards, _add_variant(SAFE_WEIGHTS_INDEX_NAME, variant) if len(shards) > 1 else None,
                      sum(unit.nbytes for unit in units), total_parameters, notes)


def saved_names(model, tensors: dict) -> list[str]:
    """The state-dict names transformers' `save_pretrained` would write: without `_keys_to_ignore_on_save`, and with
    one name per tied group, chosen by its own `remove_tied_weights_from_state_dict` (given a one-element stand-in
    per distinct tensor, shared by tied names, so nothing is gathered to decide)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    stand_ins: dict[int, torch.Tensor] = {}
    shadows = {}
    for name, tensor in tensors.items():
        if name in ignored:
            continue
        if id(tensor) not in stand_ins:
            stand_ins[id(tensor)] = torch.zeros(1)
        shadows[name] = stand_ins[id(tensor)]
    kept = remove_tied_weights_from_state_dict(shadows, model)
    return [name for name in tensors if name in kept]


def whole_shape(name: str, tensor, record: EPModelRecord) -> tuple[int, ...]:
    if isinstance(tensor, DTensor):  # the model as transformers returned it: the DTensor knows its global shape
        return tuple(tensor.shape)
    shape = tuple(tensor.ds_shape) if hasattr(tensor, "ds_shape") else tuple(tensor.shape)  # ZeRO-3: partitioned
    if name in record.expert_rows:
        return (record.expert_rows[name], *shape[1:])
    return shape


def entry_of(name: str, tensor, record: EPModelRecord) -> Entry:
    route = route_of(name, tensor, record)
    expert = name in record.expert_rows and not (isinstance(tensor, DTensor) and route == "gathered")
    return Entry(name, whole_shape(name, tensor, record), tensor.dtype, route, expert)


def route_of(name: str, tensor, record: EPModelRecord) -> str:
    """How `tensor` reaches its writer (`gather.py` describes each route)."""
    expert = name in record.expert_rows
    if isinstance(tensor, DTensor):
        if all(isinstance(placement, Replicate) for placement in tensor.placements):
            return "whole"
        if expert and tuple(tensor.placements) == (RowsSplit(0),) and tensor.device_mesh.size() == record.ep_size:
            return "expert-local"
        return "gathered"
    partition = getattr(tensor, "ds_tensor", None)
    if partition is None:
        return "expert-local" if expert else "whole"
    if (hasattr(partition, "ds_quant_scale") or str(getattr(partition, "final_location", None)).endswith("nvme")
            or partition.dtype != tensor.dtype):
        return "gathered"  # quantized or swapped-out partitions: DeepSpeed's own gather reads them
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.get_process_group_ranks(tensor.ds_process_group)
    if expert:
        same_experts = list(range(rank % record.ep_size, world, record.ep_size))
        return "expert-zero" if group == same_experts else "gathered"
    return "zero" if group == list(range(world)) else "gathered"


def check_consecutive_ep_groups(record: EPModelRecord) -> None:
    """The expert routes send to the writer's EP group, found as the ep consecutive ranks holding it (every
    layout the library builds is so)."""
    rank = dist.get_rank()
    first = rank - rank % record.ep_size
    if tuple(record.ep_ranks) != tuple(range(first, first + record.ep_size)):
        raise ExportError(
            f"rank {rank}'s expert-parallel group is {list(record.ep_ranks)}, not {record.ep_size} consecutive ranks "
            "starting at a multiple of the EP size; the export reads experts from such groups. Load with "
            "ep_ds_shim.DPxEPLayout(ep_size).from_pretrained_kwargs(...)."
        )


def _specs(tensors: dict) -> dict[str, Spec]:
    return {key: (tuple(value.shape), value.dtype) for key, value in tensors.items()}


def _layer_of(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `model.layers.3.`; no layer index -> ''."""
    match = re.match(r"^(.*?\.\d+\.)", name)
    return match.group(1) if match else ""


def conversion_units(model, metas: dict, entries: dict[str, Entry], notes: list[str]) -> list[Unit]:
    from transformers.core_model_loading import revert_weight_conversion

    def revert(names) -> dict[str, Spec] | None:
        try:
            return _specs(revert_weight_conversion(model, {name: metas[name] for name in names}))
        except Exception:  # noqa: BLE001 - this part does not convert on its own; it is grouped below
            return None

    try:
        whole = _specs(revert_weight_conversion(model, dict(metas)))
    except Exception as error:  # noqa: BLE001 - re-raised with what to do
        raise ExportError(
            f"transformers' reverse weight conversion of {type(model).__name__} fails on shapes alone ({type(error).__name__}: "
            f"{error}), so the export cannot be planned without holding the whole model; nothing was written. Pass "
            "save_original_format=False to write the model's own key layout (this transformers release loads it)."
        ) from error

    def fits(outputs) -> bool:
        return outputs is not None and all(whole.get(key) == spec for key, spec in outputs.items())

    alone, producer, coupled = {}, {}, set()
    for name in metas:
        outputs = revert((name,))
        if not fits(outputs):
            coupled.add(name)
            continue
        alone[name] = outputs
        for key in outputs:
            if key in producer:  # two entries claim one output: it needs both
                coupled.update((name, producer[key]))
            producer.setdefault(key, name)
    order = {name: position for position, name in enumerate(metas)}
    units = [Unit((name,), alone[name], entries[name].nbytes) for name in metas if name not in coupled]
    groupings = [[]] if not coupled else [_by_layer(sorted(coupled, key=order.__getitem__)),
                                          [tuple(sorted(coupled, key=order.__getitem__))]]
    for grouping in groupings:
        grouped = [(names, revert(names)) for names in grouping]
        if all(fits(outputs) for _, outputs in grouped) and _covers(units, grouped, whole):
            joint = [Unit(names, outputs, sum(entries[n].nbytes for n in names)) for names, outputs in grouped]
            if joint:
                notes.append(f"{len(coupled)} entries convert only together with others (e.g. {min(coupled)}): "
                             f"{len(joint)} unit(s) of up to {max(unit.nbytes for unit in joint)} bytes, each written "
                             "whole into one shard")
            return sorted(units + joint, key=lambda unit: order[unit.names[0]])
    notes.append("transformers' reverse conversion of this model does not split into parts that reproduce the whole: "
                 "the export is one unit, held whole by its writer (memory: the whole model)")
    return [Unit(tuple(metas), whole, sum(entry.nbytes for entry in entries.values()))]


def _by_layer(names: list[str]) -> list[tuple[str, ...]]:
    """Entries that only convert together, grouped by layer (`model.layers.3.`); those outside any layer together."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_layer_of(name), []).append(name)
    return [tuple(group) for group in groups.values()]


def _covers(units: list[Unit], grouped: list, whole: dict) -> bool:
    """Every output of the whole conversion comes from exactly one unit."""
    seen: list[str] = [key for unit in units for key in unit.outputs]
    seen += [key for _, outputs in grouped for key in (outputs or {})]
    return len(seen) == len(set(seen)) and set(seen) == set(whole)
