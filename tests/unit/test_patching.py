"""The block's patching contract on the installed transformers release: exact restore, nesting, exceptions,
thread isolation, refusal on drift. Real transformers objects throughout; `monkeypatch` only to simulate a
drifted or newer release (a unit edge the real releases cannot produce on demand)."""

from __future__ import annotations

import threading

import pytest
import torch

import ep_ds_shim
from ep_ds_shim import _install, _state
from ep_ds_shim.errors import TargetDriftError, UnsupportedReleaseError
from ep_ds_shim.gates import zero3_question


# Read once, before any block: inside a block the bindings are the shim's wrappers.
QUESTION_NAMESPACES = _install.make_plan().question_namespaces


def snapshot():
    """Every attribute the shim may replace, as stored on its owner (descriptors included)."""
    import sys

    owned = {t.qualname: vars(t.resolve_owner())[t.name] for t in _install.targets()}
    for module_name in QUESTION_NAMESPACES:
        owned[f"{module_name}.{zero3_question.NAME}"] = vars(sys.modules[module_name])[zero3_question.NAME]
    return owned


def assert_identical(before):
    after = snapshot()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key] is value, f"{key} was not restored to the identical object"


def test_every_target_is_wrapped_inside_and_identical_after():
    before = snapshot()
    with ep_ds_shim.ep_zero3_compat():
        during = snapshot()
        replaced = [key for key in before if during[key] is not before[key]]
        # the entry, the five gates, the mesh gate (5.23+) and the ZeRO-3 question in each namespace
        assert len(replaced) >= 7, replaced
    assert_identical(before)


def test_exception_inside_restores():
    before = snapshot()
    with pytest.raises(KeyError):
        with ep_ds_shim.ep_zero3_compat():
            raise KeyError("boom")
    assert_identical(before)
    assert _state.block_depth.get() == 0


def test_nesting_and_decorator():
    before = snapshot()
    compat = ep_ds_shim.ep_zero3_compat()

    @compat
    def inner():
        return _state.block_depth.get(), snapshot()

    with compat:
        depth, during = inner()
        assert depth == 2
        assert _state.block_depth.get() == 1
        assert during == snapshot()  # the nested exit did not uninstall under the outer block
    assert_identical(before)


def test_classmethod_and_staticmethod_keep_binding_on_subclasses():
    from transformers import Qwen3MoeForCausalLM
    from transformers.modeling_utils import PreTrainedModel

    originals = {name: vars(PreTrainedModel)[name] for name in ("from_pretrained", "get_init_context", "_load_pretrained_model")}
    with ep_ds_shim.ep_zero3_compat():
        # inside, the wrapped classmethod still binds cls to the subclass it is called on
        contexts = Qwen3MoeForCausalLM.get_init_context(torch.float32, False, False, None)
        assert isinstance(contexts, list) and contexts
    for name, original in originals.items():
        assert vars(PreTrainedModel)[name] is original
    # the pitfall: restoring getattr(...).__wrapped__ would store a method bound to one class
    assert Qwen3MoeForCausalLM.from_pretrained.__self__ is Qwen3MoeForCausalLM
    assert Qwen3MoeForCausalLM.get_init_context.__self__ is Qwen3MoeForCausalLM
    assert isinstance(vars(PreTrainedModel)["_load_pretrained_model"], staticmethod)
    assert Qwen3MoeForCausalLM._load_pretrained_model is originals["_load_pretrained_model"].__func__


@pytest.fixture
def zero3_signalled():
    from transformers.integrations import HfDeepSpeedConfig

    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    config = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    yield config
    unset_hf_deepspeed_config()


def test_other_threads_see_unpatched_transformers(zero3_signalled):
    """While one thread is inside a gated call of an EP load, another thread gets transformers' own answers."""
    import transformers.modeling_utils as modeling_utils

    inside_gate = threading.Event()
    other_done = threading.Event()
    seen = {}

    def loader():
        with ep_ds_shim.ep_zero3_compat():
            record = _state.LoadRecord("Tiny", ep_size=2, zero3=True)
            with _state.loading(record):
                # the real gate: upstream raises here under ZeRO-3; the shim lets the EP load through
                seen["gate_result"] = modeling_utils.check_and_set_device_map("cpu")
                with _state.hidden_zero3():
                    seen["question_in_loader"] = modeling_utils.is_deepspeed_zero3_enabled()
                    inside_gate.set()
                    other_done.wait(10)

    def bystander():
        inside_gate.wait(10)
        seen["question_in_bystander"] = modeling_utils.is_deepspeed_zero3_enabled()
        try:
            modeling_utils.check_and_set_device_map("cpu")
            seen["bystander_gate"] = "passed"
        except ValueError as error:
            seen["bystander_gate"] = str(error)
        other_done.set()

    threads = [threading.Thread(target=loader), threading.Thread(target=bystander)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert seen["gate_result"] == {"": torch.device("cpu")}
    assert seen["question_in_loader"] is False
    assert seen["question_in_bystander"] is True
    assert "DeepSpeed Zero-3 is not compatible" in seen["bystander_gate"]


def test_without_ep_request_the_gate_behaves_as_upstream(zero3_signalled):
    import transformers.modeling_utils as modeling_utils

    with ep_ds_shim.ep_zero3_compat():
        with _state.loading(_state.LoadRecord("Tiny", ep_size=None, zero3=True)):
            with pytest.raises(ValueError, match="DeepSpeed Zero-3 is not compatible"):
                modeling_utils.check_and_set_device_map("cpu")


def test_drifted_target_is_refused_and_nothing_is_patched(monkeypatch):
    from transformers.modeling_utils import PreTrainedModel

    def _initialize_missing_keys(self, is_quantized, new_argument=None):  # a release that changed the signature
        return None

    monkeypatch.setattr(PreTrainedModel, "_initialize_missing_keys", _initialize_missing_keys)
    before = snapshot()
    with pytest.raises(TargetDriftError) as raised:
        with ep_ds_shim.ep_zero3_compat():
            pass
    message = str(raised.value)
    assert "_initialize_missing_keys" in message and "new_argument" in message and "nothing" in message
    assert_identical(before)


def test_gate_that_no_longer_consults_zero3_is_drift(monkeypatch):
    from transformers.modeling_utils import PreTrainedModel

    def _initialize_missing_keys(self, is_quantized):
        self.initialize_weights()

    monkeypatch.setattr(PreTrainedModel, "_initialize_missing_keys", _initialize_missing_keys)
    with pytest.raises(TargetDriftError, match="no longer looks up `is_deepspeed_zero3_enabled`"):
        with ep_ds_shim.ep_zero3_compat():
            pass


@pytest.mark.parametrize(
    "version,fragment",
    [("4.57.6", "different loader"), ("5.4.0", "broken upstream"), ("5.5.4", "broken upstream")],
)
def test_refused_releases_name_the_reason(monkeypatch, version, fragment):
    import transformers

    before = snapshot()
    monkeypatch.setattr(transformers, "__version__", version)
    with pytest.raises(UnsupportedReleaseError) as raised:
        with ep_ds_shim.ep_zero3_compat():
            pass
    assert version in str(raised.value) and fragment in str(raised.value)
    monkeypatch.undo()
    assert_identical(before)


def test_newer_release_needs_explicit_opt_in(monkeypatch):
    import transformers

    monkeypatch.delenv("EP_DS_SHIM_ALLOW_UNVERIFIED", raising=False)
    monkeypatch.setattr(transformers, "__version__", "5.99.0")
    with pytest.raises(UnsupportedReleaseError, match="allow_unverified=True"):
        with ep_ds_shim.ep_zero3_compat():
            pass
    with ep_ds_shim.ep_zero3_compat(allow_unverified=True):  # shape checks still pass on the real code
        assert _install.INSTALLATION.patches
    monkeypatch.setenv("EP_DS_SHIM_ALLOW_UNVERIFIED", "1")
    with ep_ds_shim.ep_zero3_compat():
        assert _install.INSTALLATION.patches


def test_bad_argument_is_a_clear_error():
    with pytest.raises(TypeError, match="allow_unverified must be a bool"):
        ep_ds_shim.ep_zero3_compat(allow_unverified="yes")


def _install_fixed(monkeypatch, names):
    import transformers.modeling_utils as modeling_utils

    from . import _fixed_release

    for name in names:
        owner = modeling_utils if name == "check_and_set_device_map" else modeling_utils.PreTrainedModel
        monkeypatch.setattr(owner, name, vars(_fixed_release)[name])


ALL_GATES = ["get_init_context", "check_and_set_device_map", "_load_pretrained_model",
             "_move_missing_keys_from_meta_to_device", "_initialize_missing_keys"]


def test_upstream_fix_is_recognised_and_nothing_is_patched(monkeypatch):
    _install_fixed(monkeypatch, ALL_GATES)
    assert _install.make_plan().upstream_fixed
    before = snapshot()
    with ep_ds_shim.ep_zero3_compat():
        assert _install.INSTALLATION.patches == []
        assert_identical(before)
    assert_identical(before)


def test_half_fixed_release_is_refused(monkeypatch):
    _install_fixed(monkeypatch, ["get_init_context", "_initialize_missing_keys"])
    with pytest.raises(TargetDriftError, match="some ZeRO-3 gates already consider expert parallelism"):
        with ep_ds_shim.ep_zero3_compat():
            pass
