"""The block's patching contract on the installed transformers release: exact restore, nesting, exceptions,
thread isolation, refusal on drift. Real transformers objects throughout; `monkeypatch` only to simulate a
drifted or newer release (a unit edge the real releases cannot produce on demand)."""

from __future__ import annotations

import threading

import pytest
import torch

import ep_ds_shim
from ep_ds_shim import patch_registry
from ep_ds_shim.errors import RestoreError, ScopeError, TargetDriftError, UnsupportedReleaseError
from ep_ds_shim.loading import context as _state
from ep_ds_shim.patch_registry import LOADING_PATCHES
from ep_ds_shim.patching.scope import Frame

# Read once, before any block: inside a block the attributes are the shim's wrappers.
PLAN = patch_registry.loading_plan()


def snapshot():
    """Every attribute the loading block may replace, as stored on its owner (descriptors included)."""
    return {item.target.qualname: vars(item.target.resolve_owner())[item.target.name] for item in PLAN.items}


def assert_identical(before):
    after = snapshot()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key] is value, f"{key} was not restored to the identical object"


def refusal(error=TargetDriftError) -> str:
    """Open a block that must be refused with `error`; check nothing stayed patched; the message."""
    before = snapshot()
    with pytest.raises(error) as raised:
        with ep_ds_shim.ep_zero3_compat():
            pass
    assert_identical(before)
    return str(raised.value)


def test_every_target_is_wrapped_inside_and_identical_after():
    before = snapshot()
    with ep_ds_shim.ep_zero3_compat():
        during = snapshot()
        replaced = [key for key in before if during[key] is not before[key]]
        # every planned point of the registry: the entry, the six gates, the mesh gate (5.23+) and the ZeRO-3
        # question in each namespace a gate reads it from
        assert replaced == list(before), set(before) - set(replaced)
        assert {item.point.role for item in PLAN.items} >= {"entry", "gate", "question"}
        assert sorted(item.point.name for item in PLAN.items if item.point.role == "gate") == sorted(ALL_GATES)
    assert_identical(before)


def test_exception_inside_restores():
    before = snapshot()
    with pytest.raises(KeyError):
        with ep_ds_shim.ep_zero3_compat():
            raise KeyError("boom")
    assert_identical(before)
    assert _state.LOADING.depth() == 0


def test_nesting_and_decorator():
    before = snapshot()
    compat = ep_ds_shim.ep_zero3_compat()

    @compat
    def inner():
        return _state.LOADING.depth(), snapshot()

    with compat:
        depth, during = inner()
        assert depth == 2
        assert _state.LOADING.depth() == 1
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
    message = refusal()
    assert "_initialize_missing_keys" in message and "new_argument" in message and "nothing" in message


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
        assert LOADING_PATCHES.patches
    monkeypatch.setenv("EP_DS_SHIM_ALLOW_UNVERIFIED", "1")
    with ep_ds_shim.ep_zero3_compat():
        assert LOADING_PATCHES.patches


def test_bad_argument_is_a_clear_error():
    with pytest.raises(TypeError, match="allow_unverified must be a bool"):
        ep_ds_shim.ep_zero3_compat(allow_unverified="yes")


def _install_fixed(monkeypatch, names):
    import transformers.modeling_utils as modeling_utils

    from . import _fixed_release

    for name in names:
        owner = modeling_utils if name == "check_and_set_device_map" else modeling_utils.PreTrainedModel
        monkeypatch.setattr(owner, name, vars(_fixed_release)[name])


ALL_GATES = ["get_init_context", "_from_config", "check_and_set_device_map", "_load_pretrained_model",
             "_move_missing_keys_from_meta_to_device", "_initialize_missing_keys"]


def test_upstream_fix_is_recognised_and_nothing_is_patched(monkeypatch):
    _install_fixed(monkeypatch, ALL_GATES)
    assert patch_registry.loading_plan().upstream_fixed
    before = snapshot()
    with ep_ds_shim.ep_zero3_compat():
        assert LOADING_PATCHES.patches == []
        assert_identical(before)
    assert_identical(before)


def test_half_fixed_release_is_refused(monkeypatch):
    _install_fixed(monkeypatch, ["get_init_context", "_initialize_missing_keys"])
    with pytest.raises(TargetDriftError, match="some ZeRO-3 gates already consider expert parallelism"):
        with ep_ds_shim.ep_zero3_compat():
            pass


def test_leaving_in_another_thread_is_a_clear_error_and_corrupts_nothing():
    """A block entered in one thread and left in another: ScopeError, and neither thread's state moves."""
    before = snapshot()
    block = ep_ds_shim.ep_zero3_compat()
    block.__enter__()
    errors = []

    def leave_elsewhere():
        try:
            block.__exit__(None, None, None)
        except ScopeError as error:
            errors.append(error)
        errors.append(_state.LOADING.depth())

    thread = threading.Thread(target=leave_elsewhere)
    thread.start()
    thread.join(10)
    assert isinstance(errors[0], ScopeError) and "another thread" in str(errors[0]), errors
    assert errors[1] == 0  # the other thread was never inside a block, and still is not
    assert _state.LOADING.depth() == 1 and LOADING_PATCHES.users == 1  # this thread's block is still open
    block.__exit__(None, None, None)
    assert _state.LOADING.depth() == 0
    assert_identical(before)


def test_leaving_blocks_out_of_order_is_refused():
    before = snapshot()
    outer, inner = ep_ds_shim.ep_zero3_compat(), ep_ds_shim.ep_zero3_compat()
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(ScopeError, match="not the innermost"):
        outer.__exit__(None, None, None)
    assert _state.LOADING.depth() == 2
    inner.__exit__(None, None, None)
    outer.__exit__(None, None, None)
    assert_identical(before)


def test_after_a_restore_error_nothing_of_the_shim_stays_active():
    """Someone wraps a patched attribute while the block is open: leaving raises RestoreError, leaves their
    wrapper in place, and the shim's wrapper buried under it passes every call straight through."""
    import wrapt
    from transformers.modeling_utils import PreTrainedModel

    before = snapshot()
    original = vars(PreTrainedModel)["from_pretrained"]
    try:
        _restore_error_then_checks(before, PreTrainedModel, wrapt)
    finally:
        PreTrainedModel.from_pretrained = original
    assert_identical(before)


def _restore_error_then_checks(before, PreTrainedModel, wrapt):
    with pytest.raises(RestoreError, match="replaced by someone else"):
        with ep_ds_shim.ep_zero3_compat():
            patches = list(LOADING_PATCHES.patches)
            ours = vars(PreTrainedModel)["from_pretrained"]

            def theirs(wrapped, instance, args, kwargs):
                return wrapped(*args, **kwargs)

            PreTrainedModel.from_pretrained = wrapt.FunctionWrapper(ours, theirs)
    assert LOADING_PATCHES.users == 0 and LOADING_PATCHES.patches == []
    assert patches and not any(patch.live for patch in patches)
    after = snapshot()
    assert all(after[key] is value for key, value in before.items() if not key.endswith(".from_pretrained"))
    buried = vars(PreTrainedModel)["from_pretrained"].__wrapped__
    assert buried is ours
    token = _state.LOADING.frames.set((Frame(None, None),))  # as if a block were open in this thread
    try:
        assert buried._self_enabled() is False  # the shim's entry logic never runs again
    finally:
        _state.LOADING.frames.reset(token)
    # a new block refuses to wrap over the other library's wrapper instead of stacking a second entry wrapper
    with pytest.raises(TargetDriftError, match="another library"):
        with ep_ds_shim.ep_zero3_compat():
            pass


def test_another_librarys_wrapper_is_named_once(monkeypatch):
    import transformers.integrations.accelerate as hf_accelerate
    import transformers.modeling_utils as modeling_utils
    import wrapt

    def spy(wrapped, instance, args, kwargs):
        return wrapped(*args, **kwargs)

    wrapped_question = wrapt.FunctionWrapper(modeling_utils.is_deepspeed_zero3_enabled, spy)
    monkeypatch.setattr(modeling_utils, "is_deepspeed_zero3_enabled", wrapped_question)
    monkeypatch.setattr(hf_accelerate, "is_deepspeed_zero3_enabled", wrapped_question)
    message = refusal()
    assert "another library" in message.lower()
    assert message.count("transformers.modeling_utils.is_deepspeed_zero3_enabled") == 1, message
    assert "pin a verified release" not in message.lower() and "doctor" not in message
