"""The patching mechanism every block of the shim shares: targets and their shape checks (`targets`), and
scoped, reference-counted installation with exact restore (`scope`). It knows nothing about transformers or
DeepSpeed; what is patched is listed once, in `ep_ds_shim.patch_registry`."""
