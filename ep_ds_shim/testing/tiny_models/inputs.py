"""Forward inputs for a tiny model: text drawn outside the special token ids, and for a multimodal model one small
image per sample in the layout this release's model takes (found by running its vision path, not listed)."""

from __future__ import annotations

import copy
import inspect
import json
import warnings

import torch

from .families import is_multimodal, model_class_for, text_config
from .knobs import VISION, is_int, token_ids

def _special_ids(config) -> set[int]:
    return token_ids(config.to_dict())


def _first_attr(configs, names):
    for c in configs:
        for name in names:
            try:
                value = getattr(c, name, None)
            except Exception:
                value = None
            if value is not None:
                return value
    return None


def _vision_int(vision, names, default):
    value = _first_attr([vision], names)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value if is_int(value) else default


def _image_candidates(config, vision, batch: int, generator, params: set):
    """Candidate image inputs, most common layout first: (name, kwargs for the vision path)."""
    patch = _vision_int(vision, ("patch_size", "native_patch_size"), VISION["patch_size"])
    merge = _vision_int(vision, ("spatial_merge_size", "merge_size", "adapter_merge_size"), 1)
    temporal = _vision_int(vision, ("temporal_patch_size", "patch_temporal"), 1)
    channels = _vision_int(vision, ("in_channels", "num_channels", "in_chans"), 3)
    out = []
    if "image_grid_thw" in params:
        grid = (1, 2 * merge, 2 * merge)
        n = grid[0] * grid[1] * grid[2]
        thw = torch.tensor([grid] * batch)
        for t in dict.fromkeys((temporal, 1)):
            # Qwen-VL layout: one row per patch, (channels, temporal, patch, patch) flattened
            out.append((f"grid-flat-t{t}", {"pixel_values": torch.randn(batch * n, channels * t * patch * patch,
                                                                          generator=generator),
                                            "image_grid_thw": thw}))
        # merged-token layout: one (merge*patch, merge*patch, channels) block per merged token, grid in tokens
        tokens = (1, 2, 2)
        out.append(("grid-blocks", {"pixel_values": torch.randn(batch * 4, merge * patch, merge * patch, channels,
                                                                generator=generator),
                                    "image_grid_thw": torch.tensor([tokens] * batch)}))
    if "image_position_ids" in params:
        # patch sequence + (x, y) patch positions, pooled by pooling_kernel_size: a (2k x 2k) patch grid -> 4 tokens
        k = _vision_int(vision, ("pooling_kernel_size",), 1)
        side = 2 * k
        xy = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy"), -1).reshape(-1, 2)
        out.append(("patches-positions", {
            "pixel_values": torch.rand(batch, side * side, channels * patch * patch, generator=generator),
            "image_position_ids": xy.unsqueeze(0).repeat(batch, 1, 1)}))
    size = _vision_int(vision, ("image_size",), patch * 4)
    fixed = {"pixel_values": torch.randn(batch, channels, size, size, generator=generator)}
    if "image_sizes" in params:
        fixed["image_sizes"] = torch.tensor([[size, size]] * batch)
    out.append(("fixed", fixed))
    return out


def _count_image_tokens(model, kwargs: dict, batch: int, hidden: int) -> int | None:
    """Placeholder tokens per image: the release's own `get_image_features` output, in text-hidden-sized rows."""
    get = getattr(model, "get_image_features", None) or getattr(getattr(model, "model", None), "get_image_features", None)
    if get is None:
        return None
    accepted = set(inspect.signature(get).parameters)
    call = {k: v for k, v in kwargs.items() if k in accepted or "kwargs" in accepted}
    out = get(**call)
    feats = out
    if hasattr(out, "pooler_output") and getattr(out, "pooler_output", None) is not None:
        feats = out.pooler_output
    elif hasattr(out, "last_hidden_state"):
        feats = out.last_hidden_state
    tensors = list(feats) if isinstance(feats, (list, tuple)) else [feats]
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    total = sum(t.numel() for t in tensors)
    if total % (hidden * batch):
        return None
    return total // (hidden * batch)


_IMAGE_PLANS: dict[str, tuple] = {}
IMAGE_FALLBACKS: dict[str, str] = {}
"""Multimodal model types whose sample inputs fell back to text only, with the reason (filled by `sample_inputs`)."""


def _image_plan(config, batch: int, params: set):
    """(layout name, tokens per image) that this release's model accepts, found by running the vision path of a
    throw-away tiny model on each candidate layout; None when no layout works (text-only inputs)."""
    key = json.dumps(config.to_dict(), sort_keys=True, default=str) + f"|{batch}"
    if key in _IMAGE_PLANS:
        return _IMAGE_PLANS[key]
    from transformers.modeling_utils import set_zero3_state

    vision = _first_attr([config], ("vision_config",))
    hidden = text_config(config).hidden_size
    plan, errors = None, []
    with torch.random.fork_rng(), torch.no_grad(), warnings.catch_warnings(), set_zero3_state():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = model_class_for(config.model_type)(copy.deepcopy(config)).eval()
        generator = torch.Generator().manual_seed(0)
        for name, kwargs in _image_candidates(config, vision, batch, generator, params):
            try:
                n = _count_image_tokens(model, kwargs, batch, hidden)
                if not n:
                    errors.append(f"{name}: no image features")
                    continue
                ids, extra = _with_images(config, [[0] * 4] * batch, kwargs, n)
                model(input_ids=ids, **extra, **_type_ids(ids, config, params))
                plan = (name, n)
                break
            except Exception as e:  # this layout is not the one the model takes
                errors.append(f"{name}: {type(e).__name__}: {str(e)[:160]}")
    if plan is None:
        IMAGE_FALLBACKS[config.model_type] = "; ".join(errors) or "no image layout"
    _IMAGE_PLANS[key] = plan
    return plan


def _with_images(config, rows, image_kwargs: dict, n_tokens: int):
    image_token = _first_attr([config], ("image_token_id", "image_token_index"))
    start = _first_attr([config], ("vision_start_token_id", "image_start_token_id", "boi_token_id"))
    end = _first_attr([config], ("vision_end_token_id", "image_end_token_id", "eoi_token_id"))
    tokens = ([start] if start is not None else []) + [image_token] * n_tokens + ([end] if end is not None else [])
    ids = torch.tensor([row[:2] + tokens + row[2:] for row in rows])
    return ids, dict(image_kwargs)


def _type_ids(input_ids, config, params: set) -> dict:
    out = {}
    image_token = _first_attr([config], ("image_token_id", "image_token_index"))
    if "mm_token_type_ids" in params:
        out["mm_token_type_ids"] = (input_ids == image_token).int() if image_token is not None \
            else torch.zeros_like(input_ids, dtype=torch.int)
    if "token_type_ids" in params:
        out["token_type_ids"] = (input_ids == image_token).long() if image_token is not None \
            else torch.zeros_like(input_ids)
    return out


def sample_inputs(config, *, batch: int = 2, seq: int = 8, seed: int = 1234, images: bool | None = None) -> dict:
    """Forward keyword arguments (with ``labels``) for a tiny model of `config`.

    Text: ``input_ids`` drawn outside the special token ids. Multimodal configs also get one small image per sample
    (``images=None``: when this release's model accepts one of the known layouts, else text only, recorded in
    `IMAGE_FALLBACKS`; ``images=True`` raises instead). The layout (Qwen-VL flattened patches + ``image_grid_thw``,
    merged-token blocks, or a fixed-size ``(B, C, H, W)`` image) and the number of image tokens per image are found
    by running the vision path of a throw-away tiny model, so nothing is hard-coded per family.
    ``mm_token_type_ids`` / ``token_type_ids`` are added when the forward takes them.
    """
    generator = torch.Generator().manual_seed(seed)
    text = text_config(config)
    specials = _special_ids(config)
    allowed = torch.tensor([i for i in range(text.vocab_size) if i not in specials])
    rows = allowed[torch.randint(len(allowed), (batch, seq), generator=generator)].tolist()
    try:
        params = set(inspect.signature(model_class_for(config.model_type).forward).parameters)
    except Exception:
        params = set()
    extra: dict = {}
    input_ids = torch.tensor(rows)
    want = images if images is not None else True
    if want and is_multimodal(config) and "pixel_values" in params \
            and _first_attr([config], ("vision_config",)) is not None \
            and _first_attr([config], ("image_token_id", "image_token_index")) is not None:
        plan = _image_plan(config, batch, params)
        if plan is None and images:
            raise ValueError(f"{config.model_type}: no image layout works: {IMAGE_FALLBACKS.get(config.model_type)}")
        if plan is not None:
            name, n_tokens = plan
            candidates = dict(_image_candidates(config, _first_attr([config], ("vision_config",)), batch,
                                                generator, params))
            input_ids, extra = _with_images(config, rows, candidates[name], n_tokens)
    inputs = {"input_ids": input_ids, **extra, **_type_ids(input_ids, config, params)}
    labels = input_ids.clone()
    labels[torch.isin(labels, torch.tensor(sorted(specials) or [-1]))] = -100
    inputs["labels"] = labels
    return inputs

