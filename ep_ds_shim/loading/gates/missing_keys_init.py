"""Gate 5: `PreTrainedModel._initialize_missing_keys`.

Upstream under ZeRO-3: wraps `initialize_weights()` in `deepspeed.zero.GatheredParameters(...)`, which expects
ZeRO parameters (`ds_id`, `ds_shape`) and fails or hangs on the plain/DTensor parameters of an EP model.
EP needs: the standard `initialize_weights()` on the parameters the checkpoint did not provide.
"""

from .common import Gate, gate_target

GATE = Gate(
    name="_initialize_missing_keys",
    target=gate_target(
        "transformers.modeling_utils:PreTrainedModel", "_initialize_missing_keys", "function", ("self", "is_quantized")
    ),
    upstream_under_zero3="`initialize_weights()` under `GatheredParameters`",
    with_shim="plain `initialize_weights()`",
)
