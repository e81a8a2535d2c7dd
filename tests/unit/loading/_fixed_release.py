"""Stand-ins for a transformers release that merged the upstream fix (PR #45548): same signatures as the
real gates, and each gate asks about expert parallelism next to ZeRO-3. Used to test that the shim then
patches nothing."""

from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled


def _ep_size(obj):
    return getattr(getattr(getattr(obj, "config", None), "distributed_config", None), "ep_size", 1)


@classmethod
def get_init_context(cls, dtype, is_quantized, _is_ds_init_called, allow_all_kernels):
    return is_deepspeed_zero3_enabled() and _ep_size(cls) == 1


def check_and_set_device_map(device_map):
    return is_deepspeed_zero3_enabled() and _ep_size(None) == 1


@staticmethod
def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys=None):
    return is_deepspeed_zero3_enabled() and _ep_size(model) == 1


def _move_missing_keys_from_meta_to_device(self, missing_keys, device_map, device_mesh, hf_quantizer):
    return is_deepspeed_zero3_enabled() and _ep_size(self) == 1


def _initialize_missing_keys(self, is_quantized):
    return is_deepspeed_zero3_enabled() and _ep_size(self) == 1


@classmethod
def _from_config(cls, config, **kwargs):
    return is_deepspeed_zero3_enabled() and _ep_size(config) == 1
