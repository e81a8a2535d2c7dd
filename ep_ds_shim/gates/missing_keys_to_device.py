"""Gate 4: `PreTrainedModel._move_missing_keys_from_meta_to_device`.

Upstream under ZeRO-3: returns at once ("the only case where we do not initialize the model on meta device"),
so with the meta-device init EP needs, missing parameters and non-persistent buffers (rotary `inv_freq`, ...)
would stay on `meta` and the first forward fails or computes garbage.
EP needs: the standard branch, which materialises them on the rank's device.
"""

from .._targets import Target
from . import Gate

GATE = Gate(
    name="_move_missing_keys_from_meta_to_device",
    target=Target(
        "transformers.modeling_utils:PreTrainedModel",
        "_move_missing_keys_from_meta_to_device",
        "function",
        params=("self", "missing_keys", "device_map", "device_mesh", "hf_quantizer"),
    ),
    upstream_under_zero3="early return: meta buffers and missing parameters stay on the meta device",
    standard_path="missing keys and non-persistent buffers materialised on the rank's device",
)
