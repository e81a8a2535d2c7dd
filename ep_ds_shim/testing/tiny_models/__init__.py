"""Tiny Mixture-of-Experts models of *every* family the installed transformers can expert-parallelise.

`python -m ep_ds_shim verify` uses this on a user's machine: for each model type whose config carries a
``base_model_ep_plan`` it builds a tiny random checkpoint with the installed release and checks EP loading and
training against a single-process model. It must also work for families this project has never seen, so nothing
here lists families: the config of a type is taken from `AutoConfig.for_model(model_type)` defaults and shrunk by
*attribute-name patterns* (hidden / intermediate / head / expert / layer knobs, however each family spells them),
keeping the relations the default config has (``hidden == heads * head_dim``, ``qk_head_dim == nope + rope``,
vision output size == text hidden size, the mix of dense and MoE / sliding and full layers...).

    types = ep_model_types()
    path = build_tiny_model(cache / t, t)
    model = model_class_for(t).from_pretrained(path, dtype=torch.float32)
    out = model(**sample_inputs(model.config))

One module per job:
    families.py     which model types have an EP plan, and the head class a tiny model is built with
    shrink.py       a tiny config (`tiny_config`): the default config shrunk level by level; `routing_of`
      knobs.py        the tiny sizes, and the attribute-name patterns of every kind of knob
      level.py        the rules for one config level (experts, heads, layers, vocabulary, widths ...)
      layers.py       which layers are kept, and layer indices / periods mapped onto them
      relations.py    the relations of the default config re-established (head dims, MLA, mamba, rope, windows)
      rope.py         rope sections fitted to the tiny head dims
      overrides.py    the few per-family settings that cannot be derived, each with its reason
    inputs.py       forward inputs (`sample_inputs`): text, and images in the layout the release's model takes
    checkpoint.py   the one checkpoint builder (`build_checkpoint`): built once under a file lock with a stamp,
                    seeded redraw, reload check; `build_tiny_model` (a shrunk config), `build_shrunk_model` (a given
                    config shrunk)
      hub_layout.py   expert tensors saved in the released layout where a release's loader needs it
    presets.py      the fixed tiny MoE checkpoints (`build_tiny_moe`, their configs `tiny_config_kwargs`): thin calls
                    on `build_checkpoint`; `build_tiny_checkpoint`, the preset of a family if it has one, else
                    `build_tiny_model`
"""

from .checkpoint import build_checkpoint, build_shrunk_model, build_tiny_model, built_once, expert_count, redraw
from .families import ep_model_types, has_ep_plan, is_multimodal, model_class_for
from .inputs import IMAGE_FALLBACKS, sample_inputs
from .knobs import SIZES
from .presets import MODEL_TYPES, build_tiny_checkpoint, build_tiny_moe, tiny_config_kwargs
from .shrink import routing_of, tiny_config

__all__ = [
    "IMAGE_FALLBACKS", "MODEL_TYPES", "SIZES", "build_checkpoint", "build_shrunk_model", "build_tiny_checkpoint",
    "build_tiny_model", "build_tiny_moe", "built_once",
    "ep_model_types", "expert_count", "has_ep_plan", "is_multimodal", "model_class_for", "redraw", "routing_of",
    "sample_inputs", "tiny_config", "tiny_config_kwargs",
]
