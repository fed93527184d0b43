"""Test-only callbacks for multi-process runs: each writes what its rank saw to JSON."""

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


class RecordStop(Callback):
    """Writes, per rank, the optimizer step and the RST spent when training ends."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module) -> None:
        from callbacks.rst import RSTBudget

        budget = next(c for c in trainer.callbacks if isinstance(c, RSTBudget))
        os.makedirs(self.directory, exist_ok=True)
        with open(os.path.join(self.directory, f"rank{trainer.global_rank}.json"), "w") as handle:
            json.dump({"global_step": trainer.global_step, "rst_seconds": round(budget.spent_seconds, 9)}, handle)


class RecordParameters(Callback):
    """Writes, per rank, the optimizer step and a checksum of every parameter when training ends."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module) -> None:
        checksum = {name: float(p.detach().double().sum()) for name, p in pl_module.named_parameters()}
        os.makedirs(self.directory, exist_ok=True)
        with open(os.path.join(self.directory, f"rank{trainer.global_rank}.json"), "w") as handle:
            json.dump({"global_step": trainer.global_step, "parameters": checksum}, handle)
