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
from dataclasses import dataclass, field

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


# gradient clipping explicit: its default differs across DeepSpeed 0.19.x, and the oracle clips at 1.0
DS_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, "zero_optimization": {"stage": 3},
             "steps_per_print": 10**9}


def run_family(family: str, path: str, export_root: str) -> dict:
    """Every column for one family, in order; the ZeRO-3 columns run with ZeRO-3 signalled."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    columns = {}
    record(columns, "shape_checks", shape_checks)
    subject = Family.prepare(family, path, export_root)
    record(columns, "forward", lambda: forward(subject))
    record(columns, "gradients", lambda: gradients(subject))
    gc.collect()
    hf = HfDeepSpeedConfig(DS_CONFIG)  # noqa: F841 - ZeRO-3 signalled from here on
    for name, column in (("load_equals_ep_only", load_equals_ep_only), ("zero3_step", zero3_step),
                         ("export_reload", export_reload)):
        record(columns, name, lambda: column(subject))
    del hf
    unset_hf_deepspeed_config()
    return columns


def record(columns: dict, name: str, column) -> None:
    """Run one column on every rank; a failing column is a result (its error and trace), not a crash."""
    try:
        columns[name] = column()
    except Exception as error:  # noqa: BLE001 - a failing column is a result, not a crash
        columns[name] = {"error": f"{type(error).__name__}: {error}"[:2000], "trace": traceback.format_exc()[-3000:]}
    dist.barrier()


def shape_checks() -> dict:
    from ep_ds_shim import patch_registry

    plan = patch_registry.loading_plan()
    return {"problems": plan.problems, "upstream_fixed": plan.upstream_fixed, "ok": not plan.problems}


@dataclass
class Family:
    """What every column of one family reads: the checkpoint, its head, the batches, the single-process references
    and the layout; `state` carries what one column leaves for the next (EP-only weights, the ZeRO-3 model, the
    engine)."""

    name: str
    path: str
    export_root: str
    model_class: type
    batch: dict  # the EP-only columns: upstream's EP, one batch shared by the EP group
    inputs: dict
    own_batches: list  # the DeepSpeed step: every rank on its own batch
    ref: dict
    own_ref: dict
    reference_model: torch.nn.Module
    ref_eval_logits: torch.Tensor
    layout: object
    state: dict = field(default_factory=dict)

    @classmethod
    def prepare(cls, family: str, path: str, export_root: str) -> "Family":
        import ep_ds_shim
        from ep_ds_shim import testing
        from ep_ds_shim.testing import tiny_models

        world = dist.get_world_size()
        # the head of this model type (a causal LM, or an image-text-to-text model) and one batch it takes
        model_class = tiny_models.model_class_for(family)
        config = model_class.config_class.from_pretrained(path)
        batch = tiny_models.sample_inputs(config)
        ref = testing.reference_step(path, [batch], model_class=model_class)
        own_batches = [tiny_models.sample_inputs(config, seed=1234 + rank) for rank in range(world)]
        own_ref = testing.reference_step(path, own_batches, model_class=model_class)
        reference_model = model_class.from_pretrained(path, dtype=torch.float32).eval()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            ref_eval_logits = reference_model(**inputs).logits
        return cls(family, path, export_root, model_class, batch, inputs, own_batches, ref, own_ref, reference_model,
                   ref_eval_logits, ep_ds_shim.DPxEPLayout(world))

    def ep_kwargs(self) -> dict:
        """Inside each column: on a refused release, asking is what the column records as refused."""
        return self.layout.from_pretrained_kwargs(self.path, model_class=self.model_class)


def forward(subject: Family) -> dict:
    """EP-only load (no DeepSpeed): the experts are split and the logits equal the single-process model."""
    from ep_ds_shim.experts import is_expert_parameter_name
    from ep_ds_shim.experts import local_tensor as local

    world = dist.get_world_size()
    model = subject.model_class.from_pretrained(subject.path, dtype=torch.float32, **subject.ep_kwargs()).eval()
    experts = [n for n, p in model.named_parameters() if is_expert_parameter_name(n)]
    reference = dict(subject.reference_model.named_parameters())
    sharded = all(local(p).shape[0] * world == reference[n].shape[0]
                  for n, p in model.named_parameters() if n in experts)
    with torch.no_grad():
        logits = model(**subject.inputs).logits
    subject.state["ep_only"] = {n: local(p).detach().clone() for n, p in model.named_parameters()}
    subject.state["ep_only_logits"] = logits
    diff = float((logits - subject.ref_eval_logits).abs().max())
    return {"logits": diff, "experts_sharded": sharded, "ok": sharded and diff <= TOLERANCE}


def gradients(subject: Family) -> dict:
    """EP-only, train mode: the loss and every gradient equal the single-process model's."""
    from ep_ds_shim import testing
    from ep_ds_shim.experts import local_tensor as local

    model = subject.model_class.from_pretrained(subject.path, dtype=torch.float32, **subject.ep_kwargs())
    model.train()
    out = model(**subject.batch)
    out.loss.backward()
    grads = {n: local(p.grad).detach() for n, p in model.named_parameters() if p.grad is not None}
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    diffs = testing.max_abs_diffs(grads, subject.ref["grads"], subject.layout.ep_rank)
    worst = max(diffs, key=diffs.get)
    loss = abs(out.loss.item() - subject.ref["loss"][0])
    return {"loss": loss, "grads": diffs[worst], "worst": worst, "missing": missing,
            "ok": not missing and loss <= TOLERANCE and diffs[worst] <= TOLERANCE}


def load_equals_ep_only(subject: Family) -> dict:
    """EP load while ZeRO-3 is signalled, inside the block: every weight and the logits equal the EP-only load."""
    import ep_ds_shim
    from ep_ds_shim.experts import local_tensor as local

    state = subject.state
    with ep_ds_shim.ep_zero3_compat():
        model = subject.model_class.from_pretrained(subject.path, dtype=torch.float32, **subject.ep_kwargs())
    state["zero3_model"] = model
    if "ep_only" not in state:
        return {"error": "no EP-only load to compare with (see forward)", "ok": False}
    weights = {n: local(p).detach() for n, p in model.named_parameters()}
    same_names = sorted(weights) == sorted(state["ep_only"])
    diff = max(float((weights[n] - state["ep_only"][n]).abs().max()) for n in weights) if same_names else None
    model.eval()
    with torch.no_grad():
        logits = model(**subject.inputs).logits
    model.train()
    logits_diff = float((logits - state["ep_only_logits"]).abs().max())
    return {"same_names": same_names, "weights": diff, "logits": logits_diff,
            "ok": same_names and diff == 0.0 and logits_diff <= 1e-6}


def zero3_step(subject: Family) -> dict:
    """ep_ds_shim.initialize + one step, every rank on its own batch, against one single-process step on all
    ranks' batches together."""
    import ep_ds_shim
    from ep_ds_shim import testing

    model = subject.state.get("zero3_model")
    if model is None:
        return {"error": "no EP + ZeRO-3 load (see load_equals_ep_only)", "ok": False}
    layout = subject.layout
    optimizer = torch.optim.AdamW(model.parameters(), **testing.OPTIMIZER)
    engine, *_ = ep_ds_shim.initialize(model=model, layout=layout, optimizer=optimizer, config=DS_CONFIG)
    out = engine(**subject.own_batches[layout.rank])
    engine.backward(out.loss)
    grads = testing.full_grads(engine)
    engine.step()
    subject.state["engine"] = engine
    return testing.compare_step(engine, layout, subject.own_ref, logits=out.logits, loss=out.loss, grads=grads,
                                tolerance=TOLERANCE)


def export_reload(subject: Family) -> dict:
    """ep_ds_shim.save_pretrained of the trained engine (where training is refused: of the EP model as loaded),
    reloaded in a plain single process: no loading problems, every weight as expected."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    import ep_ds_shim

    state = subject.state
    trained = "engine" in state
    target = state.get("engine", state.get("zero3_model"))
    if target is None:
        return {"error": "no EP + ZeRO-3 load (see load_equals_ep_only)", "ok": False}
    directory = os.path.join(subject.export_root, subject.name)
    ep_ds_shim.save_pretrained(target, directory, max_shard_size="100KB")
    unset_hf_deepspeed_config()  # the reload is a plain single-process load
    reloaded, info = subject.model_class.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    problems = {key: sorted(map(str, value)) for key, value in info.items() if value}
    expected = (subject.own_ref["params"] if trained
                else {n: p.detach() for n, p in subject.reference_model.named_parameters()})
    diff = max(float((p.detach() - expected[n]).abs().max()) for n, p in reloaded.named_parameters())
    return {"trained": trained, "loading_problems": problems, "max_param_diff": diff,
            "ok": not problems and diff <= TOLERANCE}


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main(*sys.argv[1:])
