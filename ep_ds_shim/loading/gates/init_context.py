"""Gate 1: `PreTrainedModel.get_init_context` (how the empty model is built).

Upstream under ZeRO-3: returns `deepspeed.zero.Init(...)` contexts, so every parameter is created full-size
and immediately partitioned across *all* ranks, while the EP hooks installed later assume meta tensors.
EP needs: the meta-device init contexts of the standard branch, so `distribute_model` / the EP plan can shard
experts by EP rank when the weights are loaded.

`get_init_context` is called positionally and never sees `distributed_config`; the EP request reaches it
through the load record `from_pretrained` sets for the calling thread (see `loading/entry.py`).

Two verified spellings: 5.25 adds `config=None` (it applies the model's `fusion_config` patches inside the init
context, moved there from `from_pretrained`). The wrapper passes every argument through untouched and only hides
the ZeRO-3 question, so the fusion contexts are built exactly as without ZeRO-3 (docs/design.md, "Releases").
"""

from .common import Gate, gate_target

GATE = Gate(
    name="get_init_context",
    target=gate_target(
        "transformers.modeling_utils:PreTrainedModel", "get_init_context", "classmethod",
        ("cls", "dtype", "is_quantized", "_is_ds_init_called", "allow_all_kernels"),  # 5.3-5.24
        ("cls", "dtype", "is_quantized", "_is_ds_init_called", "allow_all_kernels", "config"),  # 5.25
    ),
    upstream_under_zero3="`zero.Init` (full-size, partitioned over all ranks)",
    with_shim="meta-device init",
)
