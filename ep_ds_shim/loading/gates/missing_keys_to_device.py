"""Gate 4: `PreTrainedModel._move_missing_keys_from_meta_to_device`.

Upstream under ZeRO-3: returns at once ("the only case where we do not initialize the model on meta device"),
so with the meta-device init EP needs, missing parameters and non-persistent buffers (rotary `inv_freq`, ...)
would stay on `meta` and the first forward fails or computes garbage.
EP needs: the standard branch, which materialises them on the rank's device.
"""

from .common import Gate, gate_target

GATE = Gate(
    name="_move_missing_keys_from_meta_to_device",
    target=gate_target(
        "transformers.modeling_utils:PreTrainedModel", "_move_missing_keys_from_meta_to_device", "function",
        ("self", "missing_keys", "device_map", "device_mesh", "hf_quantizer"),
    ),
    upstream_under_zero3="early return (buffers stay on `meta`)",
    with_shim="materialised",
)
