"""One rank of one support-matrix row: every column for one tiny MoE family on the installed releases.

    torchrun --nproc_per_node 2 tools/matrix_worker.py <report.json> <family>=<checkpoint> [...]

Columns (each recorded with its numbers; the matrix tool turns them into pass/fail):
  shape_checks         the shim's read-only checks of every target on this release
  forward              EP-only load (no DeepSpeed): logits equal the single-process model
  gradients            EP-only, train mode: loss and every gradient equal the single-process model
  load_equals_ep_only  EP load while ZeRO-3 is signalled, inside the block: every weight and the logits equal the
                       EP-only load
  zero3_step           ep_ds_shim.initialize + one step, every rank on its own batch: logits, loss, gradients, grad
                       norm, weights after AdamW equal one single-process step on all ranks' batches together
  export_reload        ep_ds_shim.save_pretrained of the trained engine (where training is refused: of the EP model
                       as loaded), reloaded in a plain single process: no missing / unexpected / mismatched keys, and
                       every weight equal to the single-process model after the same step (or to the checkpoint)
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

TOLERANCE = 1e-5


def main(report_path: str, *families: str) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    report = {"rank": rank, "families": {}}
    for item in families:
        family, _, path = item.partition("=")
        report["families"][family] = run_family(family, path, os.path.join(os.path.dirname(report_path), "exports"))
        gc.collect()
    with open(report_path.format(rank=rank), "w") as handle:
        json.dump(report, handle, indent=1, default=str)
    dist.barrier()
    dist.destroy_process_group()


def run_family(family: str, path: str, export_root: str) -> dict:
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    import ep_ds_shim
    from ep_ds_shim import patch_registry, testing
    from ep_ds_shim.testing import tiny_models
    from ep_ds_shim.experts import is_expert_parameter_name
    from ep_ds_shim.experts import local_tensor as local

    world = dist.get_world_size()
    columns = {}

    def record(name, fn):
        try:
            columns[name] = fn()
        except Exception as error:  # noqa: BLE001 - a failing column is a result, not a crash
            columns[name] = {"error": f"{type(error).__name__}: {error}"[:2000], "trace": traceback.format_exc()[-3000:]}
        dist.barrier()

    def shape_checks():
        plan = patch_registry.loading_plan()
        return {"problems": plan.problems, "upstream_fixed": plan.upstream_fixed, "ok": not plan.problems}

    record("shape_checks", shape_checks)

    # the head of this model type (a causal LM, or an image-text-to-text model) and one batch it takes
    model_class = tiny_models.model_class_for(family)
    config = model_class.config_class.from_pretrained(path)
    batch = tiny_models.sample_inputs(config)  # the EP-only columns: upstream's EP, one batch shared by the EP group
    ref = testing.reference_step(path, [batch], model_class=model_class)
    # the DeepSpeed step: every rank on its own batch
    own_batches = [tiny_models.sample_inputs(config, seed=1234 + rank) for rank in range(world)]
    own_ref = testing.reference_step(path, own_batches, model_class=model_class)
    reference_model = model_class.from_pretrained(path, dtype=torch.float32).eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        ref_eval_logits = reference_model(**inputs).logits
    layout = ep_ds_shim.DPxEPLayout(world)
    state = {}

    def ep_kwargs():  # inside each column: on a refused release, asking is what the column records as refused
        return layout.from_pretrained_kwargs(path, model_class=model_class)

    def forward():
        model = model_class.from_pretrained(path, dtype=torch.float32, **ep_kwargs()).eval()
        experts = [n for n, p in model.named_parameters() if is_expert_parameter_name(n)]
        sharded = all(local(p).shape[0] * world == dict(reference_model.named_parameters())[n].shape[0]
                      for n, p in model.named_parameters() if n in experts)
        with torch.no_grad():
            logits = model(**inputs).logits
        state["ep_only"] = {n: local(p).detach().clone() for n, p in model.named_parameters()}
        state["ep_only_logits"] = logits
        diff = float((logits - ref_eval_logits).abs().max())
        return {"logits": diff, "experts_sharded": sharded, "ok": sharded and diff <= TOLERANCE}

    record("forward", forward)

    def gradients():
        model = model_class.from_pretrained(path, dtype=torch.float32, **ep_kwargs())
        model.train()
        out = model(**batch)
        out.loss.backward()
        grads = {n: local(p.grad).detach() for n, p in model.named_parameters() if p.grad is not None}
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        diffs = testing.max_abs_diffs(grads, ref["grads"], layout.ep_rank)
        worst = max(diffs, key=diffs.get)
        loss = abs(out.loss.item() - ref["loss"][0])
        return {"loss": loss, "grads": diffs[worst], "worst": worst, "missing": missing,
                "ok": not missing and loss <= TOLERANCE and diffs[worst] <= TOLERANCE}

    record("gradients", gradients)
    gc.collect()

    # gradient clipping explicit: its default differs across DeepSpeed 0.19.x, and the oracle clips at 1.0
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, "zero_optimization": {"stage": 3},
                 "steps_per_print": 10**9}
    hf = HfDeepSpeedConfig(ds_config)  # noqa: F841 - ZeRO-3 signalled from here on

    def load_equals_ep_only():
        with ep_ds_shim.ep_zero3_compat():
            model = model_class.from_pretrained(path, dtype=torch.float32, **ep_kwargs())
        state["zero3_model"] = model
        if "ep_only" not in state:
            return {"error": "no EP-only load to compare with (see forward)", "ok": False}
        weights = {n: local(p).detach() for n, p in model.named_parameters()}
        same_names = sorted(weights) == sorted(state["ep_only"])
        diff = max(float((weights[n] - state["ep_only"][n]).abs().max()) for n in weights) if same_names else None
        model.eval()
        with torch.no_grad():
            logits = model(**inputs).logits
        model.train()
        logits_diff = float((logits - state["ep_only_logits"]).abs().max())
        return {"same_names": same_names, "weights": diff, "logits": logits_diff,
                "ok": same_names and diff == 0.0 and logits_diff <= 1e-6}

    record("load_equals_ep_only", load_equals_ep_only)

    def zero3_step():
        model = state.get("zero3_model")
        if model is None:
            return {"error": "no EP + ZeRO-3 load (see load_equals_ep_only)", "ok": False}
        optimizer = torch.optim.AdamW(model.parameters(), **testing.OPTIMIZER)
        engine, *_ = ep_ds_shim.initialize(model=model, layout=layout, optimizer=optimizer, config=ds_config)
        out = engine(**own_batches[layout.rank])
        engine.backward(out.loss)
        grads = testing.full_grads(engine)
        engine.step()
        state["engine"] = engine
        return testing.compare_step(engine, layout, own_ref, logits=out.logits, loss=out.loss, grads=grads,
                                    tolerance=TOLERANCE)

    record("zero3_step", zero3_step)

    def export_reload():
        # the trained engine; where training is refused (an upstream defect), the EP model as loaded
        trained = "engine" in state
        target = state.get("engine", state.get("zero3_model"))
        if target is None:
            return {"error": "no EP + ZeRO-3 load (see load_equals_ep_only)", "ok": False}
        directory = os.path.join(export_root, family)
        ep_ds_shim.save_pretrained(target, directory, max_shard_size="100KB")
        unset_hf_deepspeed_config()  # the reload is a plain single-process load
        reloaded, info = model_class.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
        problems = {key: sorted(map(str, value)) for key, value in info.items() if value}
        expected = own_ref["params"] if trained else {n: p.detach() for n, p in reference_model.named_parameters()}
        diff = max(float((p.detach() - expected[n]).abs().max()) for n, p in reloaded.named_parameters())
        return {"trained": trained, "loading_problems": problems, "max_param_diff": diff,
                "ok": not problems and diff <= TOLERANCE}

    record("export_reload", export_reload)
    del hf
    unset_hf_deepspeed_config()
    return columns


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(*sys.argv[1:])
