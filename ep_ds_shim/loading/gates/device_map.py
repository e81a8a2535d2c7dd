"""Gate 2: `check_and_set_device_map`, as `from_pretrained` calls it after tensor-parallel setup.

Upstream under ZeRO-3: tensor/expert-parallel setup sets `device_map = device("<type>:<LOCAL_RANK>")`, and this
check then raises `ValueError: DeepSpeed Zero-3 is not compatible with passing a device_map` on every rank.
EP needs: the device map accepted, as in an EP-only load.

The target is the name `from_pretrained` looks up in `transformers.modeling_utils`; the ZeRO-3 question inside
it is looked up in `transformers.integrations.accelerate`, which the shim also answers for (see `loading/zero3_question.py`).
"""

from .common import Gate, gate_target

GATE = Gate(
    name="check_and_set_device_map",
    target=gate_target("transformers.modeling_utils", "check_and_set_device_map", "function", ("device_map",)),
    upstream_under_zero3="ValueError: DeepSpeed Zero-3 is not compatible with passing a device_map",
    with_shim="accepted: the per-rank device map of the EP setup",
)
