"""The library's logger: a child of transformers' logger tree, so `TRANSFORMERS_VERBOSITY` and
`transformers.logging.set_verbosity_*` apply to it. It logs at INFO (which gates a load took, groups supplied);
warnings are for things a user must act on."""

from __future__ import annotations

from transformers.utils import logging

logger = logging.get_logger("transformers.ep_ds_shim")
