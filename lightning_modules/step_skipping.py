"""Abandoning an optimizer step after its backward, the model-side half of ``core.contracts.SkipsOptimizerSteps``.

In Lightning's automatic optimization the step's last forward and backward run *inside* the optimizer's
``step(closure)``: the closure runs them, then the ``on_before_optimizer_step`` hooks, then
``configure_gradient_clipping``; only when it returns does the optimizer update anything. Every optimizer
(``torch.optim``'s, fused or not; this project's; ``pytorch-optimizer``'s SOAP and schedule-free AdamW)
evaluates the closure before it reads or writes its state. So a check that decides in
``on_before_optimizer_step`` that the step must not happen (``NonFiniteCheck(action="skip")``) calls
``skip_optimizer_step()``; after every such hook has run, ``configure_gradient_clipping`` raises inside the
closure; the exception leaves ``optimizer.step`` before the update and ``optimizer_step`` catches it. No
parameter and no optimizer state (moments, step counts, schedule-free's weight sum) changes, whatever
the optimizer; zeroing the gradients alone would not do (schedule-free AdamW and others count a step
without gradients). Lightning still counts the step (``global_step``) and steps the learning-rate schedule.
"""

from __future__ import annotations

from typing import Any

__all__ = ["StepSkippingMixin"]


class _AbandonedStep(Exception):
    """Raised inside the optimizer's closure to leave ``optimizer.step`` before it updates anything."""


class StepSkippingMixin:
    """Mixin for LightningModules (before ``LightningModule`` in the bases): ``skip_optimizer_step``."""

    _skipping_step = False

    def skip_optimizer_step(self) -> None:
        """Abandon the optimizer step in progress; call it from ``on_before_optimizer_step``."""
        self._skipping_step = True

    def on_optimizer_step_skipped(self) -> None:
        """After an abandoned step (subclasses drop what they prepared for it)."""

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        if self._skipping_step:  # the last thing Lightning runs inside the closure
            raise _AbandonedStep
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        except _AbandonedStep:
            self._skipping_step = False
            scaler = getattr(self.trainer.precision_plugin, "scaler", None)
            if scaler is not None:  # fp16: gradients unscaled but no update(): end its step, the scale unchanged
                scaler.update(new_scale=scaler.get_scale())
            self.on_optimizer_step_skipped()
            return
        if self._skipping_step:
            self._skipping_step = False
            raise RuntimeError("skip_optimizer_step() was called outside an optimizer step's closure: the step ran")
