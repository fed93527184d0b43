"""The RST budget callback: stop when the Reference System Time budget is spent; expose ``tau``.

No Train No Gain (Kaddour et al. 2023, arXiv:2307.06440, section 2): every piece of work a run does
is priced at what it costs on a reference machine (a cost table, ``core/cost_table.py``), and every
schedule is a function of ``tau = RST spent / RST budget``. The arithmetic lives in
``core/budget.py``; this callback measures or prices this process's work, sums it over the processes
once per optimizer step (in table mode without batch selection: this rank's times the number of ranks,
with no collective and no read of the device), logs it on logging steps, hands the progress bar its
numbers (``progress_bar_values``) and stops every process at the same optimizer step. With batch
selection it also reports the share of the RST spent scoring candidates (``rst/selection_seconds``)
next to the rest (``rst/training_seconds``). A method's own kind of work (an EMA update) is charged with
``charged_work``: to the ledger (priced by the table's ``work_seconds``) and, in wall mode, as measured time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from core.budget import BUDGET_STATE_KEY, BudgetAccount, saved_budget_state
from core.contracts import BatchSelector, BudgetClock, ChargesWork, DoesOwnWork, SequenceSchedule
from core.cost_table import CostTable
from core.durations import format_duration, parse_duration
from core.errors import UserError

__all__ = ["RSTBudget", "charged_work"]


@contextmanager
def charged_work(trainer: L.Trainer, kind: str, amount: float = 1.0, *, per: str = "events") -> Iterator[None]:
    """Charge the work done inside the block to the run's budget: ``amount`` units of ``kind``.

    The units go to the module's work ledger (``WorkLedger.charge_work``; a table-mode budget prices them
    with its table's ``work_seconds``); a wall-mode budget adds the block's measured time, unless the block
    runs inside a training batch it already times. Without a budget, or for a module without a ledger, the
    block just runs.

    >>> # in a callback's hook:  with charged_work(trainer, "ema_update"): ema_update(average, weights, 0.99)
    """
    start = time.monotonic()
    yield
    seconds = time.monotonic() - start
    ledger = getattr(trainer.lightning_module, "work_ledger", None)
    if ledger is not None:
        ledger.charge_work(kind, amount, per=per)
    for clock in trainer.callbacks:
        if isinstance(clock, RSTBudget):
            clock.add_measured_work(seconds)



class RSTBudget(Callback, BudgetClock):
    """Stop training when the Reference System Time budget is spent; expose ``tau`` to every schedule.

    Args:
        budget: the RST budget: seconds, or a duration such as ``90s``, ``30m``, ``24h``.
        table: path of the cost table (JSON, format ``rst-table/1``); required in ``table`` mode.
        mode: ``table`` charges the work ledger at the table's reference prices; ``wall`` uses the time
            this machine measures for training steps (this machine becomes the reference).

    Raises:
        UserError: a bad duration, a missing table, a table that cannot price this run, or a checkpoint
            whose budget state does not fit this run (see ``BudgetAccount.resume``).

    >>> RSTBudget(budget="90s", mode="wall").budget_seconds
    90.0
    """

    def __init__(self, budget: str | float = "24h", table: str | None = None, mode: Literal["table", "wall"] = "table"):
        super().__init__()
        self.budget = budget
        self.table_path = table
        self.mode = mode
        self.budget_seconds = parse_duration(budget)
        if mode not in ("table", "wall"):
            raise UserError(f"RSTBudget mode={mode!r}: use 'table' or 'wall'")
        if mode == "table" and not table:
            raise UserError("RSTBudget in table mode needs table=PATH (e.g. configs/rst/bert-paper.json), or mode=wall")
        self._account: BudgetAccount | None = None  # built on first use, so `calibrate` can write the table first
        self._restored: dict[str, Any] | None = None  # budget state found in the checkpoint being resumed
        self._restored_step: int | None = None  # optimizer step of that checkpoint (None: not resuming)
        self._baseline = 0.0  # this rank's measured/priced seconds at fit start
        self._selection_baseline = 0.0  # ... of which spent scoring candidates (batch selection)
        self._selection_offset = 0.0  # selection RST of the whole run before this fit (checkpoint)
        self.selection_spent = 0.0  # selection RST of the whole run, as of the last sync
        self._wall_train = 0.0  # seconds measured in training batches on this rank
        self._wall_own_work = 0.0  # seconds of methods' own work measured outside them (``charged_work``)
        self._batch_start: float | None = None
        self._fit_start = time.monotonic()
        self._synced_step = -1
        self._checked_step = -1

    @property
    def account(self) -> BudgetAccount:
        if self._account is None:
            table = CostTable.load(self.table_path) if self.mode == "table" else None
            self._account = BudgetAccount(self.budget_seconds, self.mode, table)
        return self._account

    @property
    def table(self) -> CostTable | None:
        """The cost table (``None`` in wall mode)."""
        return self.account.table

    @property
    def state_key(self) -> str:
        return BUDGET_STATE_KEY  # one key whatever the mode, so a resume in another mode is detected and refused

    # ----- the clock ------------------------------------------------------------------------------
    def budget_progress(self) -> float:
        """tau = RST spent / budget, as of the last optimizer step."""
        return self.account.progress()

    @property
    def spent_seconds(self) -> float:
        return self.account.spent

    @staticmethod
    def _selector(pl_module: L.LightningModule) -> BatchSelector | None:
        trainer = pl_module._trainer
        callbacks = trainer.callbacks if trainer is not None else []
        return next((c for c in callbacks if isinstance(c, BatchSelector)), None)

    def _local_seconds(self, pl_module: L.LightningModule) -> tuple[float, float]:
        """This rank's seconds in this fit so far: ``(all, of which scoring candidates)``."""
        selector = self._selector(pl_module)
        if self.mode == "wall":  # the measured batches, and the one in progress (the LR schedule syncs mid-batch)
            running = time.monotonic() - self._batch_start if self._batch_start is not None else 0.0
            scoring = selector.scoring_wall_seconds if selector is not None else 0.0  # 0 when selection is free
            return self._wall_train + self._wall_own_work + running + scoring, scoring
        world_size = pl_module.trainer.world_size if pl_module._trainer is not None else 1
        ledger = pl_module.work_ledger
        return self.account.price(ledger, world_size), self.account.table.seconds(ledger.of_kind("fwd"))

    def add_measured_work(self, seconds: float) -> None:
        """Wall mode: add ``seconds`` of a method's own work, unless a training batch in progress times it."""
        if self.mode == "wall" and self._batch_start is None:
            self._wall_own_work += float(seconds)

    def sync(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Bring ``spent`` up to date on every rank; idempotent within an optimizer step.

        In table mode, when every rank does the same work (no batch selection, no own work counted per
        example), the whole run's RST is this rank's times the number of ranks: host arithmetic, no
        collective and no read of the device. Otherwise one all-reduce, read on the host (a synchronisation)."""
        if self._synced_step == trainer.global_step:
            return
        total, selection = self._local_seconds(pl_module)
        total, selection = total - self._baseline, selection - self._selection_baseline
        world_size = trainer.world_size
        if self.mode == "table" and self._same_work_on_every_rank(pl_module):
            reduced = [total * world_size, selection * world_size]
        elif world_size == 1:
            reduced = [total, selection]
        else:
            dtype = torch.float32 if pl_module.device.type == "mps" else torch.float64  # MPS has no float64
            value = torch.tensor([total, selection], dtype=dtype, device=pl_module.device)
            reduce_op = "max" if self.mode == "wall" else "sum"  # wall: ranks run in lockstep; table: all work counts
            reduced = trainer.strategy.reduce(value, reduce_op=reduce_op).tolist()
        self.account.record(reduced[0])
        self.selection_spent = self._selection_offset + reduced[1]
        self._synced_step = trainer.global_step

    def _same_work_on_every_rank(self, pl_module: L.LightningModule) -> bool:
        """Whether each rank's ledger is the same as every other's: no batch selection (ranks score different
        numbers of candidates), no own work counted per example (``charge_work(per="examples")``)."""
        ledger = pl_module.work_ledger
        return self._selector(pl_module) is None and not any(name.endswith("/examples") for name in ledger.counts)

    # ----- hooks ----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        clocks = [c for c in trainer.callbacks if isinstance(c, BudgetClock)]
        if len(clocks) > 1:
            raise UserError(f"trainer.callbacks holds {len(clocks)} budget clocks: keep one RSTBudget")
        if not isinstance(pl_module, ChargesWork):
            raise UserError(f"RSTBudget needs a module that charges a work ledger; {type(pl_module).__name__} does not")
        if self.table is not None:
            data = trainer.datamodule
            self.table.check_run(
                micro_batch_size=getattr(data, "batch_size", self.table.micro_batch_size),
                seq_len=getattr(data, "seq_len", self.table.seq_len),
                num_layers=getattr(pl_module, "num_layers", 1),
            )

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # called for every callback when a checkpoint is restored, whether or not it holds this one's state
        self._restored = saved_budget_state(checkpoint)
        self._restored_step = int(checkpoint.get("global_step", 0))

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning restored the loops, the module and the callbacks (resume): start counting here
        if self._restored_step is not None:
            self._selection_offset = float((self._restored or {}).get("selection_seconds", 0.0))
            message = self.account.resume(
                self._restored, step=self._restored_step, work_before=pl_module.work_done(trainer.world_size)
            )
            rank_zero_info(f"RSTBudget: {message}.")
            self._restored, self._restored_step = None, None
        self._batch_start = None
        if self.table is not None:
            for optimizer in trainer.optimizers:  # a price it lacks fails now, not at the first step
                self.table.optimizer_step(type(optimizer).__name__)
            for callback in trainer.callbacks:
                if isinstance(callback, DoesOwnWork):
                    for kind in callback.work_kinds():
                        self.table.work(kind)
                if isinstance(callback, SequenceSchedule):
                    self.table.check_lengths(callback.lengths(getattr(trainer.datamodule, "seq_len", self.table.seq_len)))
        self._baseline, self._selection_baseline = self._local_seconds(pl_module)
        self.selection_spent = self._selection_offset
        self._checked_step = trainer.global_step
        self._synced_step = -1
        self._fit_start = time.monotonic()
        self.account.start()
        if self.account.exhausted():  # resumed from a run whose budget is already spent
            trainer.should_stop = True

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_start = time.monotonic()

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._batch_start is not None:
            self._wall_train += time.monotonic() - self._batch_start
            self._batch_start = None
        if trainer.global_step == self._checked_step:
            return  # inside gradient accumulation: decide at optimizer-step boundaries only
        self._checked_step = trainer.global_step
        self.sync(trainer, pl_module)  # a no-op if the LR scheduler already synced at this step
        account = self.account
        if account.exhausted() and not trainer.should_stop:
            trainer.should_stop = True  # the same decision on every rank: `spent` is the all-reduced sum
            rank_zero_info(
                f"RST budget {format_duration(self.budget_seconds)} spent at optimizer step {trainer.global_step} "
                f"(RST {account.spent:.3f} s, wall {time.monotonic() - self._fit_start:.1f} s)"
            )
        if trainer.global_step % max(trainer.log_every_n_steps, 1) and not trainer.should_stop:
            return  # Lightning writes step metrics on logging steps only: do not build them on the others
        metrics = {
            "rst/seconds": account.spent,
            "rst/fraction": account.progress(),
            "rst/remaining": account.remaining(),
            "time/wall_seconds": time.monotonic() - self._fit_start,
        }
        if self._selector(pl_module) is not None:
            metrics["rst/selection_seconds"] = self.selection_spent
            metrics["rst/training_seconds"] = account.spent - self.selection_spent
        pl_module.log_dict(
            metrics,
            on_step=True,
            on_epoch=False,
            sync_dist=False,
            rank_zero_only=False,
        )

    def progress_bar_values(self) -> dict[str, float]:
        """RST spent and left (seconds) for the progress bar: host numbers, read at every step without a sync."""
        account = self.account
        return {"rst_spent": account.spent, "rst_left": account.remaining()}

    # ----- checkpoint -----------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self.account.state_dict(), "selection_seconds": self.selection_spent}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)  # read in on_train_start, once the module's ledger is restored too
