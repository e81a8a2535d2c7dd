"""The model's dtype against the DeepSpeed config's precision, checked before `deepspeed.initialize`.

DeepSpeed trusts its config: without a "bf16" / "fp16" section it treats the model as fp32 and keeps no fp32 master
copy, so a model loaded in bf16 then trains in pure bf16 (AdamW updates the bf16 weights directly, and an update
smaller than bf16's resolution, about 0.4% of a weight, is lost), with no word (measured: a bf16 model and a
config without "bf16" trained without a message). With a section, DeepSpeed casts the model to that precision.
"""

from __future__ import annotations

import os

import torch

from ..log import logger

_SECTIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def config_precision(config) -> torch.dtype | None | str:
    """torch.bfloat16 / torch.float16 when the config enables that section, None when it enables neither, "unknown"
    when it cannot be read here (a path elsewhere, or "auto" values a launcher fills in later)."""
    if isinstance(config, (str, os.PathLike)):
        return "unknown"
    if not isinstance(config, dict):
        return "unknown"
    for section, dtype in _SECTIONS.items():
        enabled = (config.get(section) or {}).get("enabled", False)
        if enabled == "auto":
            return "unknown"
        if enabled:
            return dtype
    return None


def model_dtype(model) -> torch.dtype | None:
    """The floating dtype holding most of the model's weights."""
    sizes: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if param.is_floating_point():
            sizes[param.dtype] = sizes.get(param.dtype, 0) + param.numel()
    return max(sizes, key=sizes.get) if sizes else None


def disagreement(model, config) -> str | None:
    """What is wrong with training `model` under `config`'s precision, or None."""
    wanted, held = config_precision(config), model_dtype(model)
    if wanted == "unknown" or held is None:
        return None
    if wanted is None and held in (torch.bfloat16, torch.float16):
        name = "bf16" if held == torch.bfloat16 else "fp16"
        return (f"the model's weights are {held} but the DeepSpeed config enables neither \"bf16\" nor \"fp16\": "
                f"DeepSpeed then keeps no fp32 master weights and AdamW updates the {name} weights directly (updates "
                f"below {name}'s resolution are lost). Add \"{name}\": {{\"enabled\": true}} to the config (fp32 master "
                "weights, mixed precision), or load the model with dtype=torch.float32.")
    if wanted is not None and held not in (wanted, torch.float32):
        return (f"the model's weights are {held} but the DeepSpeed config asks for {wanted}: DeepSpeed casts them to "
                f"{wanted} before training. Load the model with dtype={wanted} or torch.float32, or change the "
                "config's precision section.")
    return None


def check(model, config) -> str | None:
    """Log the disagreement, if any, as a warning (once per call, on every rank), and return it."""
    problem = disagreement(model, config)
    if problem:
        logger.warning(f"ep_ds_shim: {problem}")
    return problem
