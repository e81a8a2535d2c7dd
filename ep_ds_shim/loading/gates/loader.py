"""Gate 3: `PreTrainedModel._load_pretrained_model` (how checkpoint tensors reach the parameters).

Upstream under ZeRO-3: rank 0 reads the whole checkpoint, the other ranks read it on `meta`, and
`_load_state_dict_into_zero3_model` writes full tensors through `GatheredParameters`: the EP plan's per-rank
expert slicing never runs (ranks diverge on sizes, or every rank gets every expert).
EP needs: the standard loader (`convert_and_load_state_dict_in_model`), which gives each rank its own slice of
every expert tensor according to the EP plan.
"""

from .common import Gate, gate_target

GATE = Gate(
    name="_load_pretrained_model",
    target=gate_target(
        "transformers.modeling_utils:PreTrainedModel", "_load_pretrained_model", "staticmethod",
        ("model", "state_dict", "checkpoint_files", "load_config", "expected_keys"),
    ),
    upstream_under_zero3="rank-0 full read, writes through `GatheredParameters`",
    with_shim="standard loader: each rank gets its expert slice",
)
