"""The loading side: the `ep_zero3_compat` block (`block`), its table of patch points (`patches`), its
per-thread/task state (`context`), the `from_pretrained` entry wrapper (`entry`) with its request checks (`request`,
`loaded_model`, `legacy_spelling`), the six ZeRO-3 gates (`gates/`), the ZeRO-3 question (`zero3_question`) and the
DP x EP mesh sizing (`replica_mesh`). It imports `patching/`, `releases/` and the shared top-level modules, never
`training/`: the training side is reached through one hook resolved at run time (`entry.TRAINING_HOOK`)."""
