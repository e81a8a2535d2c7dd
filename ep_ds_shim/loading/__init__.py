"""The loading side: the `ep_zero3_compat` block (`block`), its per-thread state (`state`), the `from_pretrained`
entry wrapper (`entry`) with its request checks (`request`, `loaded_model`, `legacy_spelling`), the five ZeRO-3
gates (`gates/`), the ZeRO-3 question (`zero3_question`) and the DP x EP mesh sizing (`replica_mesh`)."""
