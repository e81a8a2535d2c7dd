"""The training side: the DP x EP layout and DeepSpeed's groups (`layout`), what the shim records about an EP
model (`record`) and how it makes it DeepSpeed-ready (`deepspeed_ready`, the loading block's one hook into this
side), the checks around the hand-over to DeepSpeed (`deepspeed_handover`, `agreement`, `guard`), the
`supply_deepspeed_groups` block for launchers (`launcher_groups`), the Trainer (`trainer`), and saving: export,
EP-aware save paths and checkpoints (`export`, `engine_paths`, `checkpoints`)."""
