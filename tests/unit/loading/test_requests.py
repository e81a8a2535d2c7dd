"""Bad EP requests are refused with a clear error before any collective (real from_pretrained, one process)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

import ep_ds_shim
from ep_ds_shim.errors import EPRequestError
from ep_ds_shim.experts import expert_parameters
from ep_ds_shim.releases.lines import release_line_for
from ep_ds_shim.releases.spelling import FlagWithDeviceMesh
from ep_ds_shim.releases.support import transformers_version


@contextlib.contextmanager
def zero3_signalled():
    """ZeRO-3 signalled the way accelerate / Trainer do it: a live HfDeepSpeedConfig."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    config = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
    try:
        yield config
    finally:
        unset_hf_deepspeed_config()


def installed_line():
    return release_line_for(transformers_version())


def ep2_config(path):
    """What the installed release's own spelling asks for, for EP over 2 ranks, built without a process group
    (the 5.6-5.14 spelling needs a mesh, so there the request is read from tp_size instead)."""
    from transformers.distributed import DistributedConfig

    spelling = installed_line().spelling
    if isinstance(spelling, FlagWithDeviceMesh):
        return {"distributed_config": DistributedConfig(enable_expert_parallel=True), "tp_size": 2}
    return spelling.build(2, model_ref=str(path), model_class=None, ep_mesh=None)


@pytest.fixture
def single_rank_group(monkeypatch):
    """A real one-process gloo group that reports a world of 2: validation must refuse before any collective,
    so no peer is ever needed."""
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    yield
    monkeypatch.undo()
    dist.destroy_process_group()


def test_ep_without_process_group(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint("qwen3_moe")
    assert not dist.is_initialized()
    with zero3_signalled(), ep_ds_shim.ep_zero3_compat():
        with pytest.raises(EPRequestError, match="no initialised process group"):
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **ep2_config(path))


def test_experts_not_divisible(tiny_checkpoint, single_rank_group):
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint("qwen3_moe", num_experts=3)
    with zero3_signalled(), ep_ds_shim.ep_zero3_compat():
        with pytest.raises(EPRequestError, match="3 experts.*ep_size=2"):
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **ep2_config(path))


def test_model_without_ep_plan(tmp_path, single_rank_group):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with zero3_signalled(), ep_ds_shim.ep_zero3_compat():
        with pytest.raises(EPRequestError, match="no expert-parallel plan"):
            AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, **ep2_config(tmp_path))


def test_plan_with_a_gradient_sum_over_the_ep_group_is_refused(tmp_path, single_rank_group):
    """muse_spark keeps a norm inside its experts replicated with a gradient all-reduce over the EP group, which
    DeepSpeed would never do: refused before the load, naming the plan entry (not a half-right training run)."""
    from ep_ds_shim.loading.request import UNCARRIED_EP_STYLES, validate_request
    from ep_ds_shim.releases.lines import RELEASE_LINES
    from ep_ds_shim.testing import tiny_models

    uncarried = [t for t in tiny_models.ep_model_types() if any(
        style in UNCARRIED_EP_STYLES for style in experts_plan(t).values())]
    if not uncarried:
        pytest.skip("no family of this release has such a plan entry")
    model_type = uncarried[0]
    model_class = tiny_models.model_class_for(model_type)
    tiny_models.tiny_config(model_type).save_pretrained(tmp_path)
    with pytest.raises(EPRequestError, match="replicated_with_grad_allreduce") as raised:
        validate_request(model_class, (str(tmp_path),), {}, 1, RELEASE_LINES[-1])
    assert "silently wrong" in str(raised.value) and model_class.__name__ in str(raised.value)


def experts_plan(model_type: str) -> dict:
    from ep_ds_shim.experts import ep_plan_of
    from ep_ds_shim.testing import tiny_models

    return ep_plan_of(tiny_models.model_class_for(model_type), tiny_models.tiny_config(model_type))


def test_outside_zero3_the_block_does_not_interfere(tiny_checkpoint):
    """No ZeRO-3 signalled: a plain load inside the block is the plain load."""
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint("qwen3_moe")
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with ep_ds_shim.ep_zero3_compat():
        inside = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert "_ep_ds_shim" not in inside.__dict__
    for (name, a), (_, b) in zip(plain.named_parameters(), inside.named_parameters()):
        assert torch.equal(a, b), name


def _legacy_release():
    return installed_line().legacy_flag_silently_off


@pytest.mark.skipif(not _legacy_release(), reason="the legacy flag does not turn EP off silently on this release")
def test_legacy_flag_that_turns_ep_off_is_refused_under_zero3_without_translation(tiny_checkpoint,
                                                                                 single_rank_group):
    """Translated by default (tests/distributed/loading/test_upstream_ep_tests.py); with the switch off, refused."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    path = tiny_checkpoint("qwen3_moe")
    with zero3_signalled(), ep_ds_shim.ep_zero3_compat(translate_upstream_spelling=False):
        with pytest.raises(EPRequestError, match="enable_expert_parallel=True.*refused under ZeRO-3"):
            AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, distributed_config=DistributedConfig(enable_expert_parallel=True)
            )
        with pytest.raises(EPRequestError, match="refused under ZeRO-3"):  # the dict spelling too
            AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, distributed_config={"enable_expert_parallel": True}
            )


@pytest.mark.skipif(not _legacy_release(), reason="the legacy flag does not turn EP off silently on this release")
def test_legacy_flag_built_before_the_block_is_refused_too(tiny_checkpoint, single_rank_group):
    """The config is built before the block is entered (nothing of the shim sees its construction)."""
    import warnings

    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    path = tiny_checkpoint("qwen3_moe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        legacy = DistributedConfig(enable_expert_parallel=True)
    with zero3_signalled(), ep_ds_shim.ep_zero3_compat(translate_legacy_spelling=False):  # the former name
        with pytest.raises(EPRequestError, match="enable_expert_parallel=True.*refused under ZeRO-3"):
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, distributed_config=legacy)
    # a plain config without any parallelism is not mistaken for it: an ordinary load, without the warning
    with ep_ds_shim.ep_zero3_compat(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, distributed_config=DistributedConfig())
    assert not [w for w in caught if "WITHOUT expert parallelism" in str(w.message)]


@pytest.mark.skipif(not _legacy_release(), reason="the legacy flag does not turn EP off silently on this release")
def test_legacy_flag_without_zero3_warns_and_loads_as_upstream(tiny_checkpoint, single_rank_group):
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    path = tiny_checkpoint("qwen3_moe")
    with ep_ds_shim.ep_zero3_compat():
        with pytest.warns(UserWarning, match="loads WITHOUT expert parallelism"):
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, distributed_config=DistributedConfig(enable_expert_parallel=True)
            )
    experts = list(expert_parameters(model).values())
    assert experts and all(p.shape[0] == 4 for p in experts)  # every expert on the rank: EP was off


@pytest.mark.skipif(installed_line().name != "5.23+", reason="upstream's canonical EP spelling is 5.23+'s")
def test_upstream_canonical_spelling_without_translation_is_refused_before_any_weight_is_read(tiny_checkpoint, tmp_path,
                                                                                          single_rank_group):
    """DistributedConfig(tp_size=N, ep_size=N) would also split the dense layers. With the translation switched off
    it is refused with the one-line fix, before the load reads anything: here there are no weights to read."""
    import shutil

    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(tiny_checkpoint("qwen3_moe") / "config.json", config_only)
    with zero3_signalled(), ep_ds_shim.ep_zero3_compat(translate_upstream_spelling=False):
        with pytest.raises(EPRequestError, match=r"tp_size=2, ep_size=2\).*splits the dense layers") as raised:
            AutoModelForCausalLM.from_pretrained(config_only, distributed_config=DistributedConfig(tp_size=2, ep_size=2))
    assert "ep_ds_shim.ep_from_pretrained_kwargs(path, ep_size=2)" in str(raised.value)
    # its own request (every TP rule "replicate") is not mistaken for it
    from ep_ds_shim.loading.legacy_spelling import dense_tp_request

    assert not dense_tp_request(ep2_config(config_only)["distributed_config"])
    assert dense_tp_request(DistributedConfig(tp_size=2, ep_size=2))


def test_dp_x_ep_is_refused_where_it_is_not_verified(tiny_checkpoint, monkeypatch):
    """world > ep on a release family without a verified DP x EP path: a clear error, before any collective."""
    import dataclasses

    from transformers import Qwen3MoeForCausalLM

    from ep_ds_shim.loading.request import validate_request
    from ep_ds_shim.releases.lines import RELEASE_LINES

    path = tiny_checkpoint("qwen3_moe")
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
        line = dataclasses.replace(RELEASE_LINES[-1], replica_mesh=False)
        with pytest.raises(EPRequestError, match="ep_size=2 on a world of 4.*not supported"):
            validate_request(Qwen3MoeForCausalLM, (str(path),), {}, 2, line)
        validate_request(Qwen3MoeForCausalLM, (str(path),), {}, 2, RELEASE_LINES[-1])  # 5.23+: fine
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()
