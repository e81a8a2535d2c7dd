"""transformers `Trainer` with an EP model under DeepSpeed.

Only what differs from a data-parallel Trainer is overridden; everything else is the Trainer's own machinery:

- batches: every rank trains on its own batches. The training sampler is the layout's (`layout.sampler`: sharded
  over every rank, seeded, the same on every launcher); the Trainer builds its DataLoader as usual (collator,
  column removal, workers, pinning, seeding), and accelerate's per-process re-sharding of it is made a
  passthrough (the sampler already shards; with DeepSpeed on CPU accelerate would count one process), the way the
  Trainer itself neutralises it for its own rank-aware `BatchRebalanceSampler`.
- who owns parallelism: the Trainer would read the EP spelling's `tp_size` as tensor parallelism and the "sharded
  at load time" flag as "transformers reduces gradients"; both are hidden while it sets up accelerate, because
  DeepSpeed owns data parallelism here.
- groups: the Trainer's `accelerator.prepare` calls `deepspeed.initialize` itself; `train()` runs inside
  `supply_deepspeed_groups(layout)`, so that call is the library's hand-over; a model loaded before `TrainingArguments(deepspeed=...)` is made DeepSpeed-ready
  before the Trainer builds its optimizer.
- saving: `save_model` (and so every checkpoint) writes the whole model (`export.py`), not one rank's experts; a
  checkpoint folder appears only once every rank has written its part (`checkpoints/trainer_folder.py`), and
  `resume_from_checkpoint` resumes in any DP x EP layout (the engine's `load_checkpoint`, `checkpoints/load.py`).

    class MyTrainer(EPTrainerMixin, Trainer): ...
    trainer = MyTrainer(model=model, args=args, train_dataset=ds, ep_layout=layout)
or simply `ep_ds_shim.EPTrainer(...)`.
"""

from __future__ import annotations

from torch.utils.data import DataLoader
from transformers import Trainer

from .checkpoints.trainer_folder import save_trainer_checkpoint
from .deepspeed_ready import make_deepspeed_ready
from .export import agree_on_outcome, gather_full_state_dict
from .launcher_groups import supply_deepspeed_groups
from .layout import DPxEPLayout
from .record import record_of


class EPTrainerMixin:
    _HIDDEN_DURING_SETUP = ("_tp_size", "_is_distributed_loading_by_transformers")

    def __init__(self, *args, ep_layout: DPxEPLayout, **kwargs):
        if not isinstance(ep_layout, DPxEPLayout):
            raise TypeError(f"ep_layout must be a DPxEPLayout, got {type(ep_layout).__name__}")
        self.ep_layout = ep_layout
        model = kwargs.get("model", args[0] if args else None)
        # What the Trainer reads at construction to decide who owns the model's parallelism. DeepSpeed owns data
        # parallelism here, so hide them while the Trainer sets itself up:
        # - `_tp_size`: the 5.2x EP spelling sets tp_size=ep_size with every TP rule "replicate" (dense layers are
        #   whole), and the Trainer would configure accelerate for tensor parallelism;
        # - `_is_distributed_loading_by_transformers`: the Trainer would skip DeepSpeed, assuming transformers
        #   reduces gradients itself.
        hidden = {name: vars(model)[name] for name in self._HIDDEN_DURING_SETUP if name in vars(model)}
        for name in hidden:
            setattr(model, name, None if name == "_tp_size" else False)
        try:
            super().__init__(*args, **kwargs)
        finally:
            for name, value in hidden.items():
                setattr(model, name, value)
        if getattr(self, "is_deepspeed_enabled", False):
            # Before the Trainer builds its optimizer from the model's parameters: a model loaded before
            # TrainingArguments(deepspeed=...) signalled DeepSpeed is still as transformers returned it.
            make_deepspeed_ready(model)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        shuffle = getattr(self.args, "train_sampling_strategy", "random") != "sequential"
        return self.ep_layout.sampler(dataset, shuffle=shuffle, seed=self.args.seed,
                                      drop_last=self.args.dataloader_drop_last)

    def get_train_dataloader(self) -> DataLoader:
        dataloader = super().get_train_dataloader()
        # accelerate wraps the batch sampler to shard it over all processes; the layout's sampler is already
        # sharded over every rank, so that wrapper must pass batches through (sharding twice would skip data).
        sharded = getattr(dataloader, "batch_sampler", None)
        if sharded is not None and hasattr(sharded, "num_processes") and hasattr(sharded, "process_index"):
            sharded.num_processes, sharded.process_index = 1, 0
        return dataloader

    def train(self, *args, **kwargs):
        with supply_deepspeed_groups(self.ep_layout):
            return super().train(*args, **kwargs)

    def _save_checkpoint(self, model, trial):
        """The Trainer's own checkpoint, written into a hidden staging folder and renamed into place once every rank
        has written its part (push_to_hub uploads from the folder while it is written, so it keeps the folder)."""
        if (not (getattr(self, "is_deepspeed_enabled", False) and record_of(self.model, required=False))
                or self.args.push_to_hub):
            return super()._save_checkpoint(model, trial)
        return save_trainer_checkpoint(self, super()._save_checkpoint, model, trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under DeepSpeed, every rank gathers the whole model (every EP rank's experts, every ZeRO partition) and
        global rank 0 saves it through the Trainer's own `_save` (model, tokenizer, training arguments). Also what
        the Trainer's checkpoints (`save_steps`, `save_only_model`) call; resumable DeepSpeed state is written next
        to it by the Trainer as usual."""
        if not (getattr(self, "is_deepspeed_enabled", False) and record_of(self.model, required=False)):
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        full = gather_full_state_dict(self.model_wrapped)
        error = None
        if full is not None:  # global rank 0 (the Trainer's should_save is True on every rank on CPU)
            try:
                self._save(output_dir, state_dict=full)
            except Exception as failure:  # noqa: BLE001 - shared with every rank below
                error = f"{type(failure).__name__}: {failure}"
        agree_on_outcome(error, f"EPTrainer.save_model({output_dir!r})")
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)


class EPTrainer(EPTrainerMixin, Trainer):
    """transformers.Trainer for EP models: `EPTrainer(model=..., args=..., train_dataset=..., ep_layout=layout)`."""
