"""Test-only callbacks for runs in their own processes: each writes what its rank saw to JSON, or injects a fault."""

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


class RecordParameters(Callback):
    """Writes, per rank, the optimizer step and a checksum of every parameter when training ends."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module) -> None:
        checksum = {name: float(p.detach().double().sum()) for name, p in pl_module.named_parameters()}
        os.makedirs(self.directory, exist_ok=True)
        with open(os.path.join(self.directory, f"rank{trainer.global_rank}.json"), "w") as handle:
            json.dump({"global_step": trainer.global_step, "parameters": checksum}, handle)


class RecordSteps(Callback):
    """Appends, per rank, one JSON line per optimizer step as it ends (flushed: a killed process keeps its
    lines): step, loss, learning rate, RST spent, active layers, the examples trained on."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._ids: list = []
        self._losses: list = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from core.contracts import BudgetClock

        self._ids += batch["example_id"].tolist()
        self._losses.append(float(outputs["loss"]))
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        clock = next((c for c in trainer.callbacks if isinstance(c, BudgetClock)), None)
        record = {"step": trainer.global_step, "loss": sum(self._losses), "lr": trainer.optimizers[0].param_groups[0]["lr"],
                  "rst": round(clock.spent_seconds, 9) if clock else None, "layers": list(pl_module.active_layers),
                  "ids": self._ids}
        self._ids, self._losses = [], []
        os.makedirs(self.directory, exist_ok=True)
        with open(os.path.join(self.directory, f"rank{trainer.global_rank}.jsonl"), "a") as handle:
            handle.write(json.dumps(record) + "\n")


class SignalAt(Callback):
    """Sends this process a signal (SIGKILL, SIGTERM) as micro-batch ``micro_batch`` of optimizer step ``step``
    (counted from 1) starts: a moment inside a step, not at a checkpoint. Where and what come from the environment
    variable ``SIGNAL_AT`` (``step:micro_batch:SIGNAME``), so that the killed run and its resumption have the same
    configuration (``--ckpt_path last`` resumes only that) and only the killed process is sent it."""

    def __init__(self, rank: int = 0) -> None:
        self.rank = rank
        step, micro_batch, name = (os.environ.get("SIGNAL_AT") or "0:0:SIGKILL").split(":")
        self.step, self.micro_batch, self.signal = int(step), int(micro_batch), name

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import signal

        if (trainer.global_step + 1 == self.step and batch_idx % trainer.accumulate_grad_batches == self.micro_batch
                and trainer.global_rank == self.rank):
            os.kill(os.getpid(), getattr(signal, self.signal))


class RaiseAt(Callback):
    """Raises ``RuntimeError`` on rank ``rank`` as optimizer step ``step`` (counted from 1) starts."""

    def __init__(self, step: int, rank: int = 1) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.step and trainer.global_rank == self.rank:
            raise RuntimeError(f"injected failure on rank {self.rank}")


class PoisonAt(Callback):
    """Makes optimizer step ``step`` (counted from 1) non-finite: ``where=loss`` sets a weight to NaN before
    the forward (only for that step: the weight is restored after the backward); ``where=gradient`` sets
    one gradient to infinity."""

    def __init__(self, step: int, where: str = "gradient") -> None:
        self.step, self.where = step, where
        self._saved = None

    def _parameter(self, pl_module):
        return next(p for p in pl_module.parameters() if p.requires_grad)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.where == "loss" and trainer.global_step + 1 == self.step:
            import torch

            with torch.no_grad():
                parameter = self._parameter(pl_module)
                self._saved = parameter.detach().clone()
                parameter.fill_(float("nan"))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step + 1 != self.step:
            return
        parameter = self._parameter(pl_module)
        if self.where == "gradient":
            parameter.grad.view(-1)[0] = float("inf")
        elif self._saved is not None:
            import torch

            with torch.no_grad():
                parameter.copy_(self._saved)
            self._saved = None


class FailOnSeed(Callback):
    """Raises ``RuntimeError`` as training starts when the run's seed (``seed_everything``) is ``seed``: a method
    that fails on one seed of a study."""

    def __init__(self, seed: int = 1) -> None:
        self.seed = seed

    def on_train_start(self, trainer, pl_module) -> None:
        if int(os.environ.get("PL_GLOBAL_SEED", "-1")) == self.seed:
            raise RuntimeError(f"injected failure on seed {self.seed}")
