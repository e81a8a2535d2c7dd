"""The six ZeRO-3 gates inside `from_pretrained`, one module each.

Every gate is a transformers function that branches on `is_deepspeed_zero3_enabled()`. For an EP load while
ZeRO-3 is signalled, the shim makes that question answer False for the duration of the gated call only, so the
release runs its *own* standard (non-ZeRO-3) branch there, exactly as an EP-only load would. No transformers
code is copied: each gate module only names its target and says what changes. The list of what is patched is
`ep_ds_shim.loading.patches`.
"""
