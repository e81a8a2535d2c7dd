"""transformers `Trainer` with an EP model under DeepSpeed ZeRO-3.

Two things differ from a data-parallel Trainer, and only those are overridden:

- batches: accelerate shards the training DataLoader over *all* ranks, but the ranks of an EP group must see the
  same batch. `get_train_dataloader` shards over data-parallel replicas with `layout.sampler(...)` instead.
- who owns parallelism: the Trainer would read the EP spelling's `tp_size` as tensor parallelism and the
  "sharded at load time" flag as "transformers reduces gradients"; both are hidden while it sets up accelerate,
  because DeepSpeed owns data parallelism here.
- groups: the Trainer's `accelerator.prepare` calls `deepspeed.initialize` without an `mpu`; `train()` runs inside
  `supply_deepspeed_groups(layout)` so it gets the DP x EP groups.

    class MyTrainer(EPTrainerMixin, Trainer): ...
    trainer = MyTrainer(model=model, args=args, train_dataset=ds, ep_layout=layout)
or simply `ep_ds_shim.hf_trainer.EPTrainer(...)`.
"""

from __future__ import annotations

from torch.utils.data import DataLoader

from .deepspeed_groups import supply_deepspeed_groups


class EPTrainerMixin:
    _HIDDEN_DURING_SETUP = ("_tp_size", "_is_distributed_loading_by_transformers")

    def __init__(self, *args, ep_layout, **kwargs):
        self.ep_layout = ep_layout
        model = kwargs.get("model", args[0] if args else None)
        # What the Trainer reads at construction to decide who owns the model's parallelism. Under ZeRO-3,
        # DeepSpeed owns data parallelism, so hide them while the Trainer sets itself up:
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

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        # releases without `train_sampling_strategy` always shuffle
        shuffle = getattr(self.args, "train_sampling_strategy", "random") != "sequential"
        sampler = self.ep_layout.sampler(
            self.train_dataset, shuffle=shuffle, seed=self.args.seed, drop_last=self.args.dataloader_drop_last
        )
        return DataLoader(
            self.train_dataset,
            batch_size=self._train_batch_size,
            sampler=sampler,
            collate_fn=self.data_collator,
            drop_last=self.args.dataloader_drop_last,
            num_workers=self.args.dataloader_num_workers,
        )

    def train(self, *args, **kwargs):
        with supply_deepspeed_groups(self.ep_layout):
            return super().train(*args, **kwargs)


def __getattr__(name):
    if name == "EPTrainer":
        from transformers import Trainer

        cls = type("EPTrainer", (EPTrainerMixin, Trainer), {"__doc__": "transformers.Trainer for EP models."})
        globals()["EPTrainer"] = cls
        return cls
    raise AttributeError(name)
