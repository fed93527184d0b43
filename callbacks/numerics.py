"""``NonFiniteCheck``: a NaN or infinity in the loss or a gradient stops the run, or skips the step.

One NaN update poisons every weight, and a run that keeps going after it burns the rest of its budget
on garbage; the checkpoints it writes meanwhile overwrite the last good one. This callback looks at
each optimizer step before the optimizer does (``on_before_optimizer_step``: gradients accumulated,
not yet clipped or applied):

- ``action="stop"`` (default): raise ``NonFiniteError`` naming the optimizer step, the loss and the
  gradient norm. Nothing of that step is applied or saved, so ``last.ckpt`` stays the last good
  state; ``train.py`` prints the message and exits with status 2.
- ``action="skip"``: abandon that step: every parameter and the whole optimizer state (step counts,
  moments, schedule-free's weight sum, Sophia's Hessian estimate) stay bit-identical, whatever the
  optimizer. Lightning still counts the step (``global_step``) and the learning-rate schedule moves on.
  The skip is counted (``numerics/skipped_steps``, checkpointed); the step's forward and backward passes
  were done, so the RST clock charges them. ``max_skips`` bounds the count: a run that keeps producing
  non-finite numbers stops after that many.

How a step is dropped decides whether the host waits for the device (docs/performance.md, "A step that
never waits"):

- **On the device** (no host synchronisation), for an optimizer that skips its own update when told so by
  a 0-d ``found_inf`` tensor, as loss scaling tells it (``skips_on_device``: PyTorch's fused Adam and AdamW,
  this project's ``AdamWScale``): the check sets ``optimizer.found_inf`` to the step's verdict, computed on
  the device, and the optimizer leaves parameters and state untouched when it is 1. The host reads the
  verdicts only on logging steps (``trainer.log_every_n_steps``), at checkpoint saves and at the end of
  training: then it counts the skips, or raises ``NonFiniteError`` naming the first bad step. That step was
  never applied, the steps after it trained on good weights, and a checkpoint is never written while a bad
  step is unreported (``state_dict`` raises first), so the last checkpoint is good. The optimizer's kernel
  ran (and returned early), so such a step is charged its optimizer step.
- **On the host**, for every other optimizer: the verdict is read at every step (one synchronisation), and
  a bad step is abandoned inside the closure (``skip_optimizer_step``, the module's half of
  ``core.contracts.SkipsOptimizerSteps``, lightning_modules/step_skipping.py) before the optimizer updates
  anything; it is not charged an optimizer step.

Every rank takes the same decision: the verdict is all-reduced on the device (``torch.distributed.all_reduce``, which
the host does not wait for; Lightning's ``strategy.reduce`` would put a barrier before it).
``train.py`` adds the callback with the default action to every ``fit`` that does not configure one.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from core.contracts import SkipsOptimizerSteps
from core.errors import TrainingStopped, UserError

__all__ = ["NonFiniteCheck", "NonFiniteError", "skips_on_device"]


class NonFiniteError(TrainingStopped):
    """Training produced a NaN or infinity; the message names the step and what to do."""


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` leaves every parameter and its whole state untouched when its ``found_inf``
    attribute is a 0-d tensor holding 1, deciding on the device (PyTorch's fused Adam/AdamW read it as loss
    scaling sets it; this project's optimizers declare ``accepts_found_inf``)."""
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return bool(optimizer.defaults.get("fused"))
    return bool(getattr(optimizer, "accepts_found_inf", False))


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
        # steps dropped on the device since the host last looked: their number, and the first one's
        # (step, loss, gradient norm); read on logging steps, checkpoint saves and at the end (``_settle``)
        self._unread: torch.Tensor | None = None
        self._first_unread: torch.Tensor | None = None
        self._trainer_for_settle: L.Trainer | None = None
        self._settled_step = -1

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer_for_settle = trainer
        self._unread = self._first_unread = None  # a fit starts with nothing unread, on its own device
        self._settled_step = -1
        if self.action == "skip" and not isinstance(pl_module, SkipsOptimizerSteps):
            raise UserError(
                f"NonFiniteCheck action=skip needs a module that can abandon an optimizer step (core.contracts."
                f"SkipsOptimizerSteps, e.g. lightning_modules.step_skipping.StepSkippingMixin); "
                f"{type(pl_module).__name__} cannot: use action=stop"
            )

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step % max(trainer.log_every_n_steps, 1) and not trainer.should_stop:
            return  # the host looks at the device's verdicts on logging steps only
        if trainer.global_step == self._settled_step:
            return  # the other micro-batches of an accumulated step
        self._settled_step = trainer.global_step
        self._settle(trainer)
        if self.action == "skip":
            pl_module.log("numerics/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._settle(trainer)
        self._release(trainer)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._release(trainer)

    @staticmethod
    def _release(trainer: L.Trainer) -> None:
        """Take the last verdict off the optimizers: a later ``step()`` outside this fit must not be dropped."""
        for optimizer in trainer.optimizers:
            optimizer.__dict__.pop("found_inf", None)

    @override
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()  # every micro-batch of the step, accumulated lazily
        self._loss = finite if self._loss is None else self._loss & finite
        self._loss_value = loss.detach()

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        if scaled:
            grads = []  # fp16 loss scaling: the scaler itself skips steps with overflowing gradients
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=pl_module.device)
        if grads and hasattr(pl_module, "reuse_gradient_norm"):
            pl_module.reuse_gradient_norm(norm)  # the same norm clipping computes next: computed once
        loss_ok = self._loss if self._loss is not None else torch.ones((), dtype=torch.bool, device=norm.device)
        bad = ~(torch.isfinite(norm) & loss_ok.to(norm.device))
        self._loss = None
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            verdicts = bad.to(torch.float32)  # one decision for every rank: an all-reduce the host does not wait
            torch.distributed.all_reduce(verdicts, op=torch.distributed.ReduceOp.MAX)  # for (no barrier before it)
            bad = verdicts > 0
        step = trainer.global_step + 1  # the step being taken, counted from 1 as the logs do
        loss = self._loss_value if self._loss_value is not None else torch.full((), float("nan"), device=norm.device)
        if not scaled and skips_on_device(optimizer):
            optimizer.found_inf = bad.to(torch.float32)  # the optimizer drops its update on the device
            self._note_on_device(bad, step, loss, norm)
            return
        if not bool(bad):  # the host waits for the verdict
            return
        if self.action == "skip" and self.skipped_steps < self.max_skips:
            self.skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
            pl_module.skip_optimizer_step()
            return
        self._raise(trainer, step, float(loss), float(norm))

    def _note_on_device(self, bad: torch.Tensor, step: int, loss: torch.Tensor, norm: torch.Tensor) -> None:
        """Count a verdict without reading it: the number of bad steps, and the first one's step, loss, norm."""
        if self._unread is None:
            self._unread = torch.zeros((), device=bad.device)
            self._first_unread = torch.zeros(3, device=bad.device)
        first = bad & (self._unread == 0)
        values = torch.stack([torch.full_like(norm, step, dtype=torch.float32), loss.float(), norm.float()])
        self._first_unread = torch.where(first, values, self._first_unread)
        self._unread += bad

    def _settle(self, trainer: L.Trainer) -> None:
        """Read the device's verdicts since the last look (one host read): count skips, or stop."""
        if self._unread is None:
            return
        count, step, loss, norm = torch.cat([self._unread.view(1), self._first_unread]).tolist()
        self._unread.zero_()
        if not count:
            return
        if self.action == "skip":
            self.skipped_steps += int(count)
            if self.skipped_steps <= self.max_skips:
                return
        self._raise(trainer, int(step), loss, norm, found_at=trainer.global_step)

    def _raise(self, trainer: L.Trainer, step: int, loss: float, norm: float, found_at: int | None = None) -> None:
        checkpoint = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved before it"
        limit = f" (after {self.skipped_steps} skipped steps, max_skips={self.max_skips})" if self.action == "skip" else ""
        found = (f" (the optimizer dropped it on the device; read at step {found_at}, the steps between trained on "
                 "good weights)") if found_at is not None and found_at != step else ""
        raise NonFiniteError(
            f"non-finite numbers at optimizer step {step}{limit}: loss {loss:.6g}, gradient norm {norm:.6g}{found}; "
            f"{kept}. Lower the learning rate or clip gradients (trainer.gradient_clip_val), or add "
            "callbacks.numerics.NonFiniteCheck with action=skip to skip such steps"
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._unread is not None and self._trainer_for_settle is not None:
            self._settle(self._trainer_for_settle)  # never save past an unreported bad step
        return {"skipped_steps": self.skipped_steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
