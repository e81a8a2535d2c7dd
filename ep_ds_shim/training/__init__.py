"""The training side: the DP x EP layout and DeepSpeed's groups (`layout`), what the shim records about an EP
model (`record`) and how it makes it DeepSpeed-ready (`adoption`), the checks around the hand-over to DeepSpeed
(`handover`, `agreement`, `guard`), the `supply_deepspeed_groups` block for launchers (`groups_scope`, `supply`),
the Trainer (`trainer`), and saving: export, EP-aware save paths and checkpoints (`export`, `engine_paths`)."""
