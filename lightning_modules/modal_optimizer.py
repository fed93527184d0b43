"""Optimizers with train and eval modes (schedule-free AdamW): the weights a run validates and saves.

A ``core.contracts.ModalOptimizer`` trains one iterate and evaluates another (schedule-free's average).
The module switches it to ``eval`` for validation and back to ``train`` afterwards and at the start of
training (a checkpoint holds eval-mode weights); ``PretrainingModule.on_save_checkpoint`` stores the
eval-mode weights.
"""

from __future__ import annotations

from typing_extensions import override

from core.contracts import ModalOptimizer

__all__ = ["ModalOptimizerMixin"]


class ModalOptimizerMixin:
    """Mixin for LightningModules (before ``LightningModule`` in the bases)."""

    def _modal_optimizer(self) -> ModalOptimizer | None:
        trainer = self._trainer
        optimizers = trainer.optimizers if trainer is not None else []
        return optimizers[0] if optimizers and isinstance(optimizers[0], ModalOptimizer) else None

    @override
    def on_validation_model_eval(self) -> None:
        super().on_validation_model_eval()
        optimizer = self._modal_optimizer()
        if optimizer is not None:
            optimizer.eval()  # evaluate the averaged weights

    @override
    def on_validation_model_train(self) -> None:
        super().on_validation_model_train()
        optimizer = self._modal_optimizer()
        if optimizer is not None and self.trainer.state.fn == "fit":
            optimizer.train()

    @override
    def on_train_start(self) -> None:
        optimizer = self._modal_optimizer()
        if optimizer is not None:
            optimizer.train()  # a checkpoint holds eval-mode weights: back to the training iterate
