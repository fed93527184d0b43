"""What every pre-training LightningModule shares: optimizer, budget-progress schedule, work ledger.

Subclasses (``BertMLM``, ``T5SpanCorruption``) build a ``transformers`` model in ``__init__``, register
its layer stacks with ``_init_layer_control`` and implement ``compute_loss`` (the training objective
on one batch) and ``per_example_loss``. The module implements the model-side contracts of
``core/contracts.py`` (``LayerControl``, ``PerExampleLoss``, ``ChargesWork``) and reads budget
progress from the run's ``BudgetClock``.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch.optim.lr_scheduler import LambdaLR

from core.batch import INPUT_IDS
from core.contracts import BudgetClock, DepthSchedule
from core.errors import UserError
from core.ledger import WorkLedger
from lightning_modules.layer_control import LayerControlMixin
from lightning_modules.schedules import LRSchedule, ScheduleName

__all__ = ["PretrainingModule", "parameter_groups"]


def parameter_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two named groups: ``decay`` (matrices and embeddings) and ``no_decay`` (biases and norm gains).

    Every parameter with fewer than two dimensions is a bias or a normalisation weight. The paper's
    code decayed LayerNorm gains through a key-name mismatch (docs/paper.md, "Departures"); we do not.
    The names label the learning-rate curves in TensorBoard (``lr/decay``, ``lr/no_decay``).
    """
    decay, no_decay = [], []
    for parameter in module.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


class PretrainingModule(LayerControlMixin, L.LightningModule):
    """Base class: optimizer from the CLI, LR schedule of budget progress, ledger charges, throughput.

    Args:
        optimizer: any ``torch.optim`` class with its arguments (``class_path`` + ``init_args`` in a
            config). ``None`` uses the subclass' default. Biases and norm weights get no weight decay.
        lr_schedule: ``triangle``, ``cosine``, ``linear`` or ``constant``, a function of budget progress.
        warmup_fraction: budget fraction of the warm-up (cosine, linear, constant schedules).
        final_lr_fraction: LR multiplier at the end of the budget (cosine floor; linear end).
        warmup_start_fraction: LR multiplier at the start of the warm-up (cosine only).
        float32_matmul_precision: ``high`` lets float32 matrix products use TF32 on GPUs that have it
            (the paper's T5 ran so); ``None`` leaves PyTorch's setting alone.
    """

    def __init__(
        self,
        optimizer: OptimizerCallable | None = None,
        lr_schedule: ScheduleName = "triangle",
        warmup_fraction: float = 0.0,
        final_lr_fraction: float = 0.0,
        warmup_start_fraction: float = 0.0,
        float32_matmul_precision: Literal["highest", "high", "medium"] | None = None,
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.float32_matmul_precision = float32_matmul_precision
        try:
            self.lr_schedule = LRSchedule(
                name=lr_schedule,
                warmup_fraction=warmup_fraction,
                final=final_lr_fraction,
                warmup_start=warmup_start_fraction,
            )
        except ValueError as error:
            raise UserError(f"model.lr_schedule: {error}") from error
        self.work_ledger = WorkLedger()  # this process's work in this fit
        self.work_before = WorkLedger()  # the whole run's work before this fit (from a checkpoint)
        self._tokens_in_window = 0
        self._window_start: float | None = None
        self._window_step = -1

    # ----- subclasses ---------------------------------------------------------------------------
    def default_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        raise NotImplementedError

    def default_weight_decay(self) -> float:
        return 0.0

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int | torch.Tensor]:
        """Return the mean loss over the batch's target tokens and their number (an int or a 0-d tensor,
        read only in validation, so training steps never wait for the device)."""
        raise NotImplementedError

    def per_example_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens the model reads from ``batch`` (for throughput)."""
        return int(batch[INPUT_IDS].numel())

    def setup(self, stage: str) -> None:
        if self.float32_matmul_precision is not None:
            torch.set_float32_matmul_precision(self.float32_matmul_precision)

    # ----- budget progress ----------------------------------------------------------------------
    def budget_clock(self) -> BudgetClock | None:
        """The run's ``BudgetClock`` callback (``RSTBudget``), or ``None`` with a step budget."""
        trainer = self._trainer
        if trainer is None:
            return None
        return next((c for c in trainer.callbacks if isinstance(c, BudgetClock)), None)

    def budget_progress(self) -> float:
        """tau in [0, 1]: from the budget clock, else ``global_step / max_steps``."""
        clock = self.budget_clock()
        if clock is not None:
            return float(clock.budget_progress())
        trainer = self._trainer
        if trainer is not None and trainer.max_steps and trainer.max_steps > 0:
            return min(1.0, trainer.global_step / trainer.max_steps)
        return 0.0

    def _has_budget(self) -> bool:
        return self.budget_clock() is not None or bool(self.trainer.max_steps and self.trainer.max_steps > 0)

    # ----- optimization -------------------------------------------------------------------------
    def build_optimizer(self) -> torch.optim.Optimizer:
        """The configured optimizer over this module's parameters (no decay on biases and norm weights)."""
        if self.optimizer_factory is None:
            return self.default_optimizer(parameter_groups(self, self.default_weight_decay()))
        probe = self.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
        weight_decay = probe.defaults.get("weight_decay", 0.0)
        return self.optimizer_factory(parameter_groups(self, weight_decay))

    def configure_optimizers(self):
        if self.lr_schedule.name != "constant" and not self._has_budget():
            raise UserError(
                f"the {self.lr_schedule.name!r} learning-rate schedule needs a budget to decay within: "
                "set trainer.max_steps, add an RST budget callback, or use model.lr_schedule=constant"
            )
        optimizer = self.build_optimizer()
        schedule = LambdaLR(optimizer, lambda _: self.lr_schedule(self.budget_progress()))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": "lr"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        """Bring the budget clock up to date (a collective, on every rank alike) before the schedule reads tau."""
        clock = self.budget_clock()
        if clock is not None:
            clock.sync(self.trainer, self)
        super().lr_scheduler_step(scheduler, metric)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.work_ledger.charge_optimizer_step(type(optimizer).__name__)

    # ----- work ----------------------------------------------------------------------------------
    def work_done(self, world_size: int) -> WorkLedger:
        """The whole run's work so far: before this fit (checkpoint) plus this fit on every process.

        Under DDP this gathers every rank's counts (a collective: call it on every rank): batch
        selection scores a different number of candidates on each rank.
        """
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if world_size > 1 and distributed and torch.distributed.get_world_size() == world_size:
            gathered: list[Any] = [None] * world_size
            torch.distributed.all_gather_object(gathered, dict(self.work_ledger.counts))
            return self.work_before + WorkLedger.over_processes(gathered)
        return self.work_before + self.work_ledger.global_work(world_size)

    # ----- steps --------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self.compute_loss(batch)
        examples = int(batch[INPUT_IDS].shape[0])
        self.work_ledger.charge_fwd_bwd(self.num_active_layers, examples)
        self.log("train/loss", loss, prog_bar=True, batch_size=examples)
        self._tokens_in_window += self.tokens_in(batch)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._window_start is None:
            self._window_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log tokens/s of the whole run, averaged over each logging interval (no device synchronisation).

        Lightning's ``ThroughputMonitor`` synchronises the GPU after every micro-batch and counts time
        spent in validation; this measures training only, once per ``log_every_n_steps`` optimizer steps.
        """
        trainer = self.trainer
        step = trainer.global_step
        if step == self._window_step or step % max(trainer.log_every_n_steps, 1):
            return  # inside gradient accumulation, or not a logging step
        self._window_step = step
        now = time.perf_counter()
        if self._window_start is not None and now > self._window_start:
            tokens = self._tokens_in_window * trainer.world_size
            self.log("perf/tokens_per_second", tokens / (now - self._window_start), on_step=True, on_epoch=False)
        self._tokens_in_window, self._window_start = 0, now

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, targets = self.compute_loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=max(int(targets), 1))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._tokens_in_window, self._window_start = 0, None  # validation time is not training throughput

    # ----- checkpoint ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        world_size = self._trainer.world_size if self._trainer is not None else 1
        checkpoint["work_ledger"] = self.work_done(world_size).state_dict()  # global: any world size can resume
        # a depth that persists (stacking) is part of the model; a per-step random draw (dropping) is not
        transient = self._trainer is not None and any(
            isinstance(c, DepthSchedule) and not c.depth_is_persistent for c in self._trainer.callbacks
        )
        checkpoint["active_layers"] = None if transient else list(self.active_layers)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.work_before = WorkLedger(checkpoint.get("work_ledger", {}))
        self.work_ledger = WorkLedger()
        active = checkpoint.get("active_layers")
        self.set_active_layers(active if active else None)
