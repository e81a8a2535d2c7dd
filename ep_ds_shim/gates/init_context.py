"""Gate 1: `PreTrainedModel.get_init_context` (how the empty model is built).

Upstream under ZeRO-3: returns `deepspeed.zero.Init(...)` contexts, so every parameter is created full-size
and immediately partitioned across *all* ranks, while the EP hooks installed later assume meta tensors.
EP needs: the meta-device init contexts of the standard branch, so `distribute_model` / the EP plan can shard
experts by EP rank when the weights are loaded.

`get_init_context` is called positionally and never sees `distributed_config`; the EP request reaches it
through the load record `from_pretrained` sets for the calling thread (see `_load.py`).
"""

from .._targets import Target
from . import Gate

GATE = Gate(
    name="get_init_context",
    target=Target(
        "transformers.modeling_utils:PreTrainedModel",
        "get_init_context",
        "classmethod",
        params=("cls", "dtype", "is_quantized", "_is_ds_init_called", "allow_all_kernels"),
    ),
    upstream_under_zero3="deepspeed.zero.Init contexts (full-size parameters partitioned over all ranks)",
    standard_path="meta-device init, so the EP plan shards experts at load time",
)
