"""The arithmetic of an RST budget, without Lightning: spent, progress tau, exhaustion, resume.

``RSTBudget`` (``callbacks/rst.py``) is a thin callback over a ``BudgetAccount``: it measures or
prices this process's work, sums it over the processes (one all-reduce per optimizer step) and hands
the total to ``record``. Everything that decides a number lives here:

- ``spent = offset + total``: ``offset`` is the RST spent before this fit (restored on resume);
- ``tau = min(1, spent / budget)``, the budget progress every schedule reads (paper section 2.1:
  the learning rate decays in the same unit as the budget);
- the budget is exhausted once ``spent >= budget``; the optimizer step that crosses it completes
  (as in the paper's code);
- ``resume`` decides what a checkpoint's state means for this run, and refuses what would silently
  restart or distort the clock (another mode, budget or price table), see its docstring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from core.cost_table import CostTable
from core.durations import format_duration
from core.errors import UserError
from core.ledger import WorkLedger

__all__ = ["BUDGET_STATE_KEY", "BudgetAccount", "BudgetMode", "saved_budget_state"]

BudgetMode = Literal["table", "wall"]

# where a Lightning checkpoint keeps the budget's state (``checkpoint["callbacks"][BUDGET_STATE_KEY]``):
# one key whatever the mode, so a resume in another mode is detected and refused
BUDGET_STATE_KEY = "RSTBudget"


def saved_budget_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The budget's state in a loaded Lightning ``checkpoint`` (``BudgetAccount.state_dict`` and the
    selection seconds), or ``None`` if the run had no RST budget."""
    return checkpoint.get("callbacks", {}).get(BUDGET_STATE_KEY)


@dataclass
class BudgetAccount:
    """RST spent against a budget.

    Args:
        budget_seconds: the budget in reference seconds.
        mode: ``table`` prices the work ledger with ``table``; ``wall`` counts this machine's measured
            training time (this machine is the reference).
        table: the cost table (``table`` mode only).
    """

    budget_seconds: float
    mode: BudgetMode = "table"
    table: CostTable | None = None
    offset: float = 0.0
    spent: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ("table", "wall"):
            raise UserError(f"RSTBudget mode={self.mode!r}: use 'table' or 'wall'")
        if self.budget_seconds <= 0:
            raise UserError(f"the RST budget must be positive, got {self.budget_seconds}")

    # ----- the clock ------------------------------------------------------------------------------
    def price(self, ledger: WorkLedger, world_size: int = 1) -> float:
        """Reference seconds of one rank's ``ledger`` (each rank pays 1/world of every optimizer step)."""
        if self.table is None:
            raise ValueError("a wall-mode budget measures time; it does not price a ledger")
        return self.table.seconds(ledger, optimizer_share=1.0 / world_size)

    def record(self, total_since_start: float) -> None:
        """Set ``spent`` from the RST of all processes since this fit started."""
        self.spent = self.offset + float(total_since_start)

    def start(self) -> None:
        """At the start of a fit: nothing spent beyond the offset yet."""
        self.spent = self.offset

    def progress(self) -> float:
        """tau = min(1, spent / budget)."""
        return min(1.0, self.spent / self.budget_seconds)

    def remaining(self) -> float:
        return max(0.0, self.budget_seconds - self.spent)

    def exhausted(self) -> bool:
        return self.spent >= self.budget_seconds

    # ----- checkpoint -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "spent_seconds": self.spent,
            "budget_seconds": self.budget_seconds,
            "mode": self.mode,
            "table_digest": self.table.prices_digest() if self.table is not None else None,
        }

    def resume(self, saved: dict[str, Any] | None, *, step: int, work_before: WorkLedger | None) -> str:
        """Continue from a checkpoint taken at optimizer ``step``; return a line saying how.

        ``saved`` is the budget state the checkpoint holds (``None`` if it was trained without an RST
        budget) and ``work_before`` the run's global work ledger up to the checkpoint.

        - the same mode, budget and prices: continue from the saved RST;
        - no budget state and ``step == 0``: start at 0;
        - no budget state, a trained checkpoint, ``table`` mode: the work done so far is priced with
          this table (exactly what a budgeted run would have charged for it), and the run goes on;
        - anything else is refused: another mode (table seconds and this machine's seconds are not the
          same unit), another budget (tau would jump, and the learning rate with it), other prices
          (the RST spent so far was charged at other prices), or a wall-mode budget added to a trained
          run (its time was never measured).
        """
        if saved is None:
            if step == 0:
                self.offset = 0.0
                return "RST budget starts at 0"
            if self.mode == "wall":
                raise UserError(
                    f"the checkpoint (optimizer step {step}) was trained without an RST budget, so its wall time "
                    "was never measured: resume with RSTBudget mode=table (the work done is priced from the "
                    "checkpoint's work ledger) or start a new run"
                )
            if work_before is None or not work_before.counts:
                raise UserError(
                    f"the checkpoint (optimizer step {step}) holds no work ledger, so the RST it spent cannot be "
                    "priced: start a new run with the RST budget from the beginning"
                )
            self.offset = self.price(work_before)
            return (
                f"the checkpoint was trained without an RST budget; its {step} optimizer steps are priced with "
                f"{self.table.path or 'the table'}: {self.offset:.3f} RST-seconds spent"
            )
        saved_mode = saved.get("mode", "table")
        if saved_mode != self.mode:
            raise UserError(
                f"the checkpoint's RST was counted in {saved_mode} mode, this run is configured with mode={self.mode}: "
                f"resume with RSTBudget mode={saved_mode}, or start a new run"
            )
        saved_budget = float(saved.get("budget_seconds", self.budget_seconds))
        if abs(saved_budget - self.budget_seconds) > 1e-9 * max(1.0, saved_budget):
            raise UserError(
                f"the checkpoint was trained for an RST budget of {format_duration(saved_budget)}, this run asks for "
                f"{format_duration(self.budget_seconds)}: every schedule is a function of the budget, so resume with "
                f"budget={saved_budget:g} or start a new run"
            )
        saved_digest = saved.get("table_digest")
        if self.table is not None and saved_digest is not None and saved_digest != self.table.prices_digest():
            raise UserError(
                f"the checkpoint's RST was charged with other prices than {self.table.path or 'this table'}: "
                "resume with the cost table the run started with, or start a new run"
            )
        self.offset = float(saved.get("spent_seconds", 0.0))
        return f"resuming with {self.offset:.3f} of {self.budget_seconds:g} RST-seconds spent"
