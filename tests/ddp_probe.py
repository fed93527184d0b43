"""A test-only callback: writes the active layers of every training micro-batch, per rank, to JSON."""

import json
import os

from lightning.pytorch.callbacks import Callback


class RecordActiveLayers(Callback):
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.records: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.records.append([trainer.global_step, list(pl_module.active_layers), batch["example_id"].tolist()])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.records.append(["validation", list(pl_module.active_layers), []])

    def on_train_end(self, trainer, pl_module) -> None:
        os.makedirs(self.directory, exist_ok=True)
        with open(os.path.join(self.directory, f"rank{trainer.global_rank}.json"), "w") as handle:
            json.dump(self.records, handle)
