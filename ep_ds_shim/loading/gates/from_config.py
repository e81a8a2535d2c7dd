"""Gate 6 (composite models): `PreTrainedModel._from_config`, as a model's own `__init__` calls it for sub-models.

Upstream under ZeRO-3: composite models (e.g. `Qwen3VLMoeModel`: ``self.visual = AutoModel.from_config(...)``)
build their sub-models through `_from_config`, which asks ``is_deepspeed_zero3_enabled() and not
_is_ds_init_called``. On the standard ZeRO-3 path `get_init_context` entered `set_zero3_state()`, so the nested
call skips it; with the meta-device init an EP load needs, the nested call enters `zero.Init` and then runs
`initialize_weights_zero3` on meta tensors: ``NotImplementedError: Cannot copy out of meta tensor; no data!``.
EP needs: the sub-model built like the rest of the model, inside the outer meta-device init.
"""

from .common import Gate, gate_target

GATE = Gate(
    name="_from_config",
    target=gate_target("transformers.modeling_utils:PreTrainedModel", "_from_config", "classmethod", ("cls", "config", "kwargs")),
    upstream_under_zero3="nested `zero.Init` + `initialize_weights_zero3` on meta tensors (composite models)",
    with_shim="built inside the outer meta-device init",
)
