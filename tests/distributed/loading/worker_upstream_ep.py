"""transformers' own EP test cases (`tests/test_expert_parallel_mixin.py` of the release's sdist) on every rank of a
torchrun job, with the EP load under a live ZeRO-3 config inside `ep_zero3_compat`, in upstream's own spelling.

    torchrun --nproc_per_node 2 worker_upstream_ep.py <sdist tests dir> <work dir> <json template> <model types...>

Upstream runs each case with `run_distributed`; here torchrun provides the ranks and this file calls the same case
functions (`_test_ep_forward_impl`, `_test_ep_backward_impl`) with upstream's tolerances. One function of the
upstream module is replaced: `_load_ep_and_reference_models`, so that its EP load (`DistributedConfig(tp_size=W,
ep_size=W)`, unchanged) runs with ZeRO-3 signalled and inside the block, and its single-process reference load
without them (under ZeRO-3 a plain load would be partitioned by `zero.Init`). The checkpoints are built as upstream
builds them (`set_seed(42)`, `model_class(config)`, `save_pretrained(save_original_format=True)`), from this
project's tiny configs (the sdist does not ship upstream's model testers). Test-harness stubs: `parameterized` (a
decorator the case functions do not use) and `distributed_testing_utils` (upstream's launcher, not in the sdist).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import traceback
import types
import warnings
from itertools import product
from pathlib import Path

import torch

EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def _load_upstream(tests_dir: Path):
    """The upstream test modules as package `upstream_tests`, with the two harness stubs."""
    stub = types.ModuleType("parameterized")
    stub.parameterized = types.SimpleNamespace(expand=lambda *a, **k: (lambda f: f))
    sys.modules.setdefault("parameterized", stub)
    package = types.ModuleType("upstream_tests")
    package.__path__ = [str(tests_dir)]
    sys.modules["upstream_tests"] = package
    launcher = types.ModuleType("upstream_tests.distributed_testing_utils")
    launcher.run_distributed = lambda **kwargs: (lambda f: f)
    sys.modules["upstream_tests.distributed_testing_utils"] = launcher
    modules = {}
    for name in ("test_tensor_parallel_mixin", "test_expert_parallel_mixin"):
        spec = importlib.util.spec_from_file_location(f"upstream_tests.{name}", tests_dir / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        modules[name] = module
    return modules["test_expert_parallel_mixin"], modules["test_tensor_parallel_mixin"]


def _ep_load_under_zero3(model_path, model_class):
    """Upstream's `_load_ep_and_reference_models`, with its EP load under ZeRO-3 inside the block (LOAD_MODE: "plain"
    is upstream as it is, "library-plain" the library's own request without DeepSpeed: the baselines)."""
    import torch.distributed as dist
    from transformers.distributed.configuration_utils import DistributedConfig
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    import ep_ds_shim

    world = dist.get_world_size()
    if os.environ.get("SPELLING") == "legacy":  # PR #45548's recipe: on 5.20+ it silently means no EP upstream
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            request = {"distributed_config": DistributedConfig(enable_expert_parallel=True)}
    else:
        request = {"distributed_config": DistributedConfig(tp_size=world, ep_size=world)}  # upstream's spelling
    if MODE == "plain":  # upstream as it is: no DeepSpeed, no block (the baseline)
        model_ep = model_class.from_pretrained(model_path, **request)
    elif MODE == "library-plain":  # the library's own request, no DeepSpeed
        model_ep = model_class.from_pretrained(model_path, **ep_ds_shim.ep_from_pretrained_kwargs(
            model_path, world, model_class=model_class))
    else:
        signalled = HfDeepSpeedConfig({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
        try:
            with ep_ds_shim.ep_zero3_compat(translate_upstream_spelling=TRANSLATE):
                model_ep = model_class.from_pretrained(model_path, **request)
        finally:
            del signalled
            unset_hf_deepspeed_config()
    dist.barrier()
    device = model_ep.device
    model_ref = model_class.from_pretrained(model_path).to(device)
    return model_ep, model_ref, device


TRANSLATE = True
MODE = os.environ.get("LOAD_MODE", "zero3-block")


def main() -> int:
    global TRANSLATE
    tests_dir, work, report, *model_types = sys.argv[1:]
    TRANSLATE = os.environ.get("TRANSLATE", "1") == "1"
    rank = int(os.environ["RANK"])
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed

    from ep_ds_shim.testing import tiny_config_kwargs

    mixin, tp_mixin = _load_upstream(Path(tests_dir))
    mixin._load_ep_and_reference_models = _ep_load_under_zero3
    if MODE == "zero3-block" and os.environ.get("PER_RANK_BATCHES") == "1":
        # A model loaded while DeepSpeed is signalled is made ready for DeepSpeed's per-rank batches: the token
        # dispatcher routes each rank's own tokens, so with upstream's identical batch on every rank each expert's raw
        # gradient holds every rank's copy of the tokens, world x the single-process gradient, which DeepSpeed then
        # averages over the world. Upstream's comparison, with that reference for expert weights (dense: unchanged).
        original = mixin._reference_grad_shard

        def per_rank_batches(name, grad, local_grad, rank, world_size, tp_plan, expert_weights=()):
            expected = original(name, grad, local_grad, rank, world_size, tp_plan, expert_weights)
            return expected * world_size if name in expert_weights else expected

        mixin._reference_grad_shard = per_rank_batches
    atol, rtol = tp_mixin.TensorParallelTesterMixin.tensor_parallel_atol, tp_mixin.TensorParallelTesterMixin.tensor_parallel_rtol
    # checkpoints first, each rank its own copy (identical: upstream's seed), before the process group exists
    cases = []
    for model_type in model_types:
        for tie in (False, True):
            config = AutoConfig.for_model(model_type, **{**tiny_config_kwargs(model_type), "tie_word_embeddings": tie})
            path = Path(work) / f"rank{rank}" / f"{model_type}-tie{int(tie)}"
            set_seed(42)
            model_class = AutoModelForCausalLM._model_mapping[type(config)]
            model_class(config).save_pretrained(path, save_original_format=True)
            for implementation in EXPERTS_IMPLEMENTATIONS:
                cases.append((f"test_ep_forward[{model_type}-tie={tie}-{implementation}]", mixin._test_ep_forward_impl,
                              path, model_class, implementation))
                if not tie:  # upstream's backward cases use the default config (untied here)
                    cases.append((f"test_ep_backward[{model_type}-{implementation}]", mixin._test_ep_backward_impl,
                                  path, model_class, implementation))
    import torch.distributed as dist

    dist.init_process_group("gloo")
    results = {}
    for name, case, path, model_class, implementation in cases:
        try:
            case(rank, str(path), model_class, atol, rtol, implementation)
            results[name] = "passed"
        except Exception as error:  # noqa: BLE001 - a failed case is a result
            results[name] = f"{type(error).__name__}: {str(error)[:400]}"
            if rank == 0:
                traceback.print_exc()
        dist.barrier()
    Path(report.format(rank=rank)).write_text(json.dumps({"rank": rank, "results": results}, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
