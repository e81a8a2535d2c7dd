"""The patching mechanism every block of the shim shares: targets and their shape checks (`targets`), from a
block's table to installed patches: plan, policy and all-or-nothing install (`installer`), and scoped,
reference-counted installation with exact restore (`scope`). It knows nothing about transformers or DeepSpeed;
the tables are `ep_ds_shim.loading.patches` and `ep_ds_shim.training.launcher_groups` (their union:
`ep_ds_shim.patch_registry`)."""
