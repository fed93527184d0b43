"""``RunCheckpoint``: Lightning's ``ModelCheckpoint`` for budgeted runs that get pre-empted.

A budgeted run on a shared cluster is killed sooner or later; what it loses is the work since its last
checkpoint, so the interval is set in the budget's own unit:

- ``every="10m"`` saves ``last.ckpt`` each time another 10 RST-minutes are spent (``RSTBudget``'s
  clock: the same moment on every rank, whatever the machine); ``every=500`` saves every 500 optimizer
  steps. At most ``every`` of work is lost to a kill.
- On SIGTERM (what SLURM sends before it kills a job, and what ``kill`` sends by default) the run
  finishes the optimizer step in progress, saves ``last.ckpt``, and stops; ``train.py`` then exits with
  status 143 without the final validation. Every rank stops at the same step: the decision is
  all-reduced at each step boundary. ``python train.py fit --config CFG --ckpt_path last`` continues it.
- Saves land only at optimizer-step boundaries, never inside gradient accumulation, so a resumed run
  repeats exactly what an uninterrupted one does. Lightning writes each file through an ``fsspec``
  transaction (a temporary file, then a rename): a kill during the write leaves the previous
  ``last.ckpt`` whole; ``train.py`` checks a checkpoint's integrity before resuming from it.

Every other argument is ``ModelCheckpoint``'s (``save_last`` defaults to ``True`` here).
"""

from __future__ import annotations

import math
import signal
import threading
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from core.contracts import BudgetClock
from core.durations import parse_duration
from core.errors import UserError

__all__ = ["RunCheckpoint"]

SIGTERM_EXIT_STATUS = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class RunCheckpoint(ModelCheckpoint):
    """Save ``last.ckpt`` every ``every`` RST (a duration) or optimizer steps (an integer), and on SIGTERM.

    Args:
        save_last: keep ``last.ckpt`` (default ``True``: what ``--ckpt_path last`` resumes).
        every: an integer: optimizer steps between saves; a duration (``30s``, ``10m``, ``1h``): RST
            between saves (needs an ``RSTBudget``); ``None``: only where ``ModelCheckpoint`` saves (the
            end of an epoch, validation).
        save_on_sigterm: on SIGTERM, save at the end of the optimizer step in progress and stop.
        **kwargs: ``ModelCheckpoint``'s arguments.
    """

    def __init__(self, every: int | str | None = None, save_on_sigterm: bool = True,
                 save_last: bool | Literal["link"] | None = True, **kwargs: Any) -> None:
        super().__init__(save_last=save_last, **kwargs)
        self.every = every
        self.save_on_sigterm = save_on_sigterm
        self.every_steps: int | None = None
        self.every_rst: float | None = None
        if isinstance(every, int) and not isinstance(every, bool):
            if every < 1:
                raise UserError(f"RunCheckpoint every={every}: give at least 1 optimizer step, or a duration like 10m")
            self.every_steps = every
        elif every is not None:
            self.every_rst = parse_duration(every)
        self.preempted = False  # set when a SIGTERM stopped the run (train.py exits with status 143)
        self._sigterm = False
        self._previous_handler: Any = None
        self._saved_step = -1
        self._clock: BudgetClock | None = None
        self._rst_at_last_step = 0.0  # RST spent at the last step boundary (checkpointed)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode, every=self.every)

    # ----- set-up ----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._clock = next((c for c in trainer.callbacks if isinstance(c, BudgetClock)), None)
        if self.every_rst is not None and self._clock is None:
            raise UserError(f"RunCheckpoint every={self.every!r} counts RST, but the run has no RSTBudget: add one, "
                            "or give every as optimizer steps (an integer)")

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._sigterm = False
        self.preempted = False
        self._saved_step = trainer.global_step
        if self.save_on_sigterm and threading.current_thread() is threading.main_thread():
            # replaces Lightning's own handler for the fit (it stops after the batch, even inside gradient
            # accumulation, without saving); restored at the end
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm(trainer))

    def _on_sigterm(self, trainer: L.Trainer):
        def handler(signum, frame) -> None:
            if not self._sigterm:
                launcher = trainer.strategy.launcher
                if launcher is not None and trainer.is_global_zero:
                    launcher.kill(signum)  # processes this one started (Lightning's DDP launcher)
            self._sigterm = True

        return handler

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last(trainer)  # last.ckpt holds the final state of a finished run

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        super().on_exception(trainer, pl_module, exception)

    # ----- saving ----------------------------------------------------------------------------------
    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if step == self._saved_step:
            return  # inside gradient accumulation, or already handled at this step
        stop = self._sigterm
        if trainer.world_size > 1 and self.save_on_sigterm:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)  # any rank told: every rank stops
        if stop and not trainer.should_stop:  # (a run that ends at this step anyway ends normally)
            self._save_last(trainer)
            self.preempted = True
            trainer.should_stop = True
            rank_zero_info(f"SIGTERM: saved {self.last_model_path} at optimizer step {step}; continue with "
                           "--ckpt_path last")
            return
        if self._due(trainer, pl_module, step):
            self._save_last(trainer)
        self._saved_step = step

    def _due(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> bool:
        if self.every_steps is not None:
            return step % self.every_steps == 0
        if self.every_rst is None or self._clock is None:
            return False
        self._clock.sync(trainer, pl_module)  # idempotent within a step; the same value on every rank
        previous, self._rst_at_last_step = self._rst_at_last_step, self._clock.spent_seconds
        return math.floor(self._rst_at_last_step / self.every_rst) > math.floor(previous / self.every_rst)

    def _save_last(self, trainer: L.Trainer) -> None:
        if self._last_global_step_saved == trainer.global_step and self.last_model_path:
            return  # ModelCheckpoint itself saved at this step
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rst_at_last_step": self._rst_at_last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._rst_at_last_step = float(state_dict.get("rst_at_last_step", 0.0))

