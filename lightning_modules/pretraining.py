"""What every pre-training LightningModule shares: optimizer, budget-progress schedule, work ledger.

Subclasses (``BertMLM``, ...) build a ``transformers`` model in ``__init__``, register its layer
stacks with ``_init_layer_control`` and implement ``compute_loss`` (the training objective on one
batch) and ``per_example_loss``.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch.optim.lr_scheduler import LambdaLR

from callbacks.ledger import WorkLedger
from lightning_modules.errors import UserError
from lightning_modules.layer_control import LayerControlMixin
from lightning_modules.schedules import LRSchedule, ScheduleName

__all__ = ["PretrainingModule", "parameter_groups"]


def parameter_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weight decay on matrices (and embeddings), none on biases and norm gains.

    Every parameter with fewer than two dimensions is a bias or a normalisation weight. The paper's
    code decayed LayerNorm gains by a key-name mismatch (PAPER.md 6.1 item 11); we do not.
    """
    decay, no_decay = [], []
    for parameter in module.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
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
        self.work_ledger = WorkLedger()
        self._last_step_time: float | None = None

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
        return int(batch["input_ids"].numel())

    def setup(self, stage: str) -> None:
        if self.float32_matmul_precision is not None:
            torch.set_float32_matmul_precision(self.float32_matmul_precision)

    # ----- budget progress ----------------------------------------------------------------------
    def budget_clock(self):
        """The callback that measures budget progress (``RSTBudget``), or ``None`` with a step budget."""
        trainer = self._trainer
        if trainer is None:
            return None
        return next((c for c in trainer.callbacks if callable(getattr(c, "budget_progress", None))), None)

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
        if clock is not None and callable(getattr(clock, "sync", None)):
            clock.sync(self.trainer, self)
        super().lr_scheduler_step(scheduler, metric)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.work_ledger.charge_optimizer_step(type(optimizer).__name__)

    # ----- steps --------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self.compute_loss(batch)
        examples = int(batch["input_ids"].shape[0])
        self.work_ledger.charge_fwd_bwd(self.num_active_layers, examples)
        self.log("train/loss", loss, prog_bar=True, batch_size=examples)
        now = time.perf_counter()
        if self._last_step_time is not None:
            self.log("perf/tokens_per_second", self.tokens_in(batch) / (now - self._last_step_time))
        self._last_step_time = now
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, targets = self.compute_loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=max(int(targets), 1))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._last_step_time = None

    # ----- checkpoint ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["work_ledger"] = self.work_ledger.state_dict()
        # a depth that persists (stacking) is part of the model; a per-step random draw (dropping) is not
        transient = self._trainer is not None and any(
            getattr(c, "transient_layer_selection", False) for c in self._trainer.callbacks
        )
        checkpoint["active_layers"] = None if transient else list(self.active_layers)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.work_ledger.load_state_dict(checkpoint.get("work_ledger", {}))
        active = checkpoint.get("active_layers")
        self.set_active_layers(active if active else None)
