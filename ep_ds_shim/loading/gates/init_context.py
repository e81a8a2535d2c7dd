"""Gate 1: `PreTrainedModel.get_init_context` (how the empty model is built).

Upstream under ZeRO-3: returns `deepspeed.zero.Init(...)` contexts, so every parameter is created full-size
and immediately partitioned across *all* ranks, while the EP hooks installed later assume meta tensors.
EP needs: the meta-device init contexts of the standard branch, so `distribute_model` / the EP plan can shard
experts by EP rank when the weights are loaded.

`get_init_context` is called positionally and never sees `distributed_config`; the EP request reaches it
through the load record `from_pretrained` sets for the calling thread (see `loading/entry.py`).
"""

from .common import Gate, gate_target

GATE = Gate(
    name="get_init_context",
    target=gate_target(
        "transformers.modeling_utils:PreTrainedModel", "get_init_context", "classmethod",
        ("cls", "dtype", "is_quantized", "_is_ds_init_called", "allow_all_kernels"),
    ),
    upstream_under_zero3="`zero.Init` (full-size, partitioned over all ranks)",
    with_shim="meta-device init",
)
