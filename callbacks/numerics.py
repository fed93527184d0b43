"""``NonFiniteCheck``: a NaN or infinity in the loss or a gradient stops the run, or skips the step.

One NaN update poisons every weight, and a run that keeps going after it burns the rest of its budget
on garbage; the checkpoints it writes meanwhile overwrite the last good one. This callback looks at
each optimizer step before the optimizer does (``on_before_optimizer_step``: gradients accumulated,
not yet clipped or applied):

- ``action="stop"`` (default): raise ``NonFiniteError`` naming the optimizer step, the loss and the
  gradient norm. Nothing of that step is applied or saved, so ``last.ckpt`` stays the last good
  state; ``train.py`` prints the message and exits with status 2.
- ``action="skip"``: drop that step's gradients and abandon it (``skip_optimizer_step``, the module's
  half of ``core.contracts.SkipsOptimizerSteps``, lightning_modules/step_skipping.py): every parameter
  and the whole optimizer state (step counts, moments, schedule-free's weight sum, Sophia's Hessian
  estimate) stay bit-identical, whatever the optimizer; no clipping, no optimizer-step charge, no
  Hessian estimate. Lightning still counts the step (``global_step``) and the learning-rate schedule
  moves on. The skip is counted (``numerics/skipped_steps``, checkpointed); the step's forward and
  backward passes were done, so the RST clock charges them. ``max_skips`` bounds the count: a run
  that keeps producing non-finite numbers stops after that many.

Every rank takes the same decision: the check is all-reduced. ``train.py`` adds the callback with the
default action to every ``fit`` that does not configure one. Cost: one reduction of the gradient norms
and one host synchronisation per optimizer step.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from core.contracts import SkipsOptimizerSteps
from core.errors import TrainingStopped, UserError

__all__ = ["NonFiniteCheck", "NonFiniteError"]


class NonFiniteError(TrainingStopped):
    """Training produced a NaN or infinity; the message names the step and what to do."""


class NonFiniteCheck(Callback):
    """Stop (or skip the step) when the loss or a gradient is not finite.

    Args:
        action: ``stop`` raises ``NonFiniteError``; ``skip`` abandons the step (nothing of it is applied) and
            continues; it needs a module that ``SkipsOptimizerSteps`` (every pre-training module).
        max_skips: with ``skip``, stop after this many skipped steps.
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", max_skips: int = 100) -> None:
        super().__init__()
        if action not in ("stop", "skip"):
            raise UserError(f"NonFiniteCheck action={action!r}: use 'stop' or 'skip'")
        self.action = action
        self.max_skips = max_skips
        self.skipped_steps = 0
        self._loss: torch.Tensor | None = None  # all micro-batch losses of the step finite (a tensor: no sync)
        self._loss_value: torch.Tensor | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.action == "skip" and not isinstance(pl_module, SkipsOptimizerSteps):
            raise UserError(
                f"NonFiniteCheck action=skip needs a module that can abandon an optimizer step (core.contracts."
                f"SkipsOptimizerSteps, e.g. lightning_modules.step_skipping.StepSkippingMixin); "
                f"{type(pl_module).__name__} cannot: use action=stop"
            )

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self.action == "skip":
            pl_module.log("numerics/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    @override
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()  # every micro-batch of the step, accumulated lazily
        self._loss = finite if self._loss is None else self._loss & finite
        self._loss_value = loss.detach()

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            grads = []  # fp16 loss scaling: the scaler itself skips steps with overflowing gradients
        norm = (torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))
                if grads else torch.zeros((), device=pl_module.device))
        loss_ok = self._loss if self._loss is not None else torch.ones((), dtype=torch.bool)
        bad = ~(torch.isfinite(norm) & loss_ok.to(norm.device))
        self._loss = None
        if trainer.world_size > 1:  # one decision for every rank
            bad = trainer.strategy.reduce(bad.to(torch.float32), reduce_op="max") > 0
        if not bool(bad):
            return
        step = trainer.global_step + 1  # the step being taken, counted from 1 as the logs do
        loss = float(self._loss_value) if self._loss_value is not None else float("nan")
        if self.action == "skip" and self.skipped_steps < self.max_skips:
            self.skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
            pl_module.skip_optimizer_step()
            return
        checkpoint = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved before it"
        limit = f" (after {self.skipped_steps} skipped steps, max_skips={self.max_skips})" if self.action == "skip" else ""
        raise NonFiniteError(
            f"non-finite numbers at optimizer step {step}{limit}: loss {loss:.6g}, gradient norm {float(norm):.6g}; "
            f"{kept}. Lower the learning rate or clip gradients (trainer.gradient_clip_val), or add "
            "callbacks.numerics.NonFiniteCheck with action=skip to skip such steps"
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
