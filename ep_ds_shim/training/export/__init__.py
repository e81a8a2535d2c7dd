"""Export: the trained EP model as one standard transformers checkpoint (docs/saving.md).

- `stream.py`: `ep_ds_shim.save_pretrained`, streamed shard by shard, written by every rank, atomic and verified;
  `plan.py` (what is written, on shapes alone), `gather.py` (one entry, whole, on its writer), `write.py` (one
  shard through transformers' reverse conversion and safetensors; reading headers back), `target.py` (the
  temporary sibling and the move into place).
- `consolidate.py`: the whole state dict on global rank 0, behind the engine's 16-bit consolidation
  (`engine_paths.py`) and `EPTrainer.save_model`.
- `single_process.py`, `save_guard.py`: transformers' own `save_pretrained` on one rank, and the guard on
  `model.save_pretrained` of a DeepSpeed-ready EP model.
"""

from .consolidate import gather_full_state_dict
from .outcome import agree_on_outcome
from .save_guard import SavePretrainedGuard
from .single_process import shard_only_entries, single_process_save
from .stream import save_pretrained

__all__ = ["SavePretrainedGuard", "agree_on_outcome", "gather_full_state_dict", "save_pretrained",
           "shard_only_entries", "single_process_save"]
