"""``train.py plan``: simulate a configured run against a cost table, without data or training.

``plan`` charges a work ledger step by step exactly as a real run does (same micro-batches, same
active layers, same arithmetic) until the budget is spent, without data or training, and reports
steps, tokens and RST per phase. A callback that changes the depth plugs in as a
``DepthSchedule`` (``core/contracts.py``): ``planned_active_layers`` (layer dropping replays the very
draws the run will make) and ``planned_phase`` to name its phases. Batch selection plugs in as a
``BatchSelector``: ``planned_scored_per_trained`` forward-only examples are charged per trained
example (its expectation: selective backprop's keep rate is random), at the step's depth.
``planned_optimizer_steps`` and ``passes_read`` tell a run at start-up how far it will read its training
split (``RhoLoss`` checks that its irreducible losses were scored for that many passes of masks).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from core.contracts import BatchSelector, BudgetClock, DepthSchedule, EstimatesHessian
from core.cost_table import CostTable
from core.errors import UserError
from core.ledger import WorkLedger

__all__ = ["passes_read", "plan_run", "planned_optimizer_steps", "simulate"]


# ----- plan ---------------------------------------------------------------------------------------
def simulate(
    table: CostTable,
    budget_seconds: float,
    *,
    micro_batch_size: int,
    micro_batches_per_step: int,
    tokens_per_example: int,
    optimizer_name: str,
    num_layers: int,
    active_layers_at: Callable[[float, int], int] | None = None,
    phase_at: Callable[[float], str] | None = None,
    max_steps: int | None = None,
    scored_per_trained: float = 0.0,
    hessian_interval: int | None = None,
    hessian_micro_batches: int = 0,
) -> dict[str, Any]:
    """Charge a ledger step by step as ``RSTBudget`` and the module do, until the budget is spent.

    ``active_layers_at(tau, step)`` gives the depth of each step; ``phase_at(tau)`` names its phase
    (``None`` or absent: the depth); ``scored_per_trained`` forward-only examples are charged per trained
    example (batch selection); every ``hessian_interval`` steps ``hessian_micro_batches`` micro-batches of
    Hessian passes are charged (Sophia). The step that crosses the budget is executed (as in the paper and
    a real run).
    """
    ledger = WorkLedger()
    phases: list[dict[str, Any]] = []
    steps, spent = 0, 0.0
    while spent < budget_seconds and (max_steps is None or steps < max_steps):
        tau = min(1.0, spent / budget_seconds)
        layers = active_layers_at(tau, steps) if active_layers_at else num_layers
        name = (phase_at(tau) if phase_at else None) or f"{layers} layer{'s' if layers != 1 else ''}"
        before = spent
        for _ in range(micro_batches_per_step):
            ledger.charge_fwd_bwd(layers, micro_batch_size)
            if scored_per_trained:
                ledger.charge_fwd(layers, micro_batch_size * scored_per_trained)
        ledger.charge_optimizer_step(optimizer_name)
        steps += 1
        if hessian_interval and steps % hessian_interval == 0:
            ledger.charge_hessian(layers, micro_batch_size * hessian_micro_batches)
        spent = table.seconds(ledger)
        if not phases or phases[-1]["phase"] != name:
            phases.append({"phase": name, "tau_start": tau, "optimizer_steps": 0, "rst_seconds": 0.0, "_layers": 0})
        phases[-1]["optimizer_steps"] += 1
        phases[-1]["rst_seconds"] += spent - before
        phases[-1]["_layers"] += layers
    for phase in phases:
        mean_layers = phase.pop("_layers") / phase["optimizer_steps"]
        phase["active_layers"] = int(mean_layers) if mean_layers == int(mean_layers) else round(mean_layers, 3)
        phase["micro_batches"] = phase["optimizer_steps"] * micro_batches_per_step
        phase["tokens"] = phase["micro_batches"] * micro_batch_size * tokens_per_example
    micro_batches = steps * micro_batches_per_step
    forwards, hessian = ledger.of_kind("fwd"), ledger.of_kind("hessian")
    return {
        "optimizer_steps": steps,
        "micro_batches": micro_batches,
        "examples": micro_batches * micro_batch_size,
        "tokens": micro_batches * micro_batch_size * tokens_per_example,
        "rst_seconds": spent,
        "selection_rst_seconds": table.seconds(forwards) if forwards.counts else 0.0,
        "scored_examples": ledger.examples("fwd"),
        "hessian_rst_seconds": table.seconds(hessian) if hessian.counts else 0.0,
        "budget_seconds": budget_seconds,
        "stopped_by": "budget" if spent >= budget_seconds else "max_steps",
        "phases": phases,
    }


def plan_run(trainer, model, datamodule, table: CostTable, budget_seconds: float) -> dict[str, Any]:
    """Simulate the configured run: its world size, accumulation, depth schedule and optimizer.

    ``trainer``, ``model`` and ``datamodule`` are the configured (not fitted) objects; only their
    settings are read.
    """
    num_layers = model.num_layers
    table.check_run(micro_batch_size=datamodule.batch_size, seq_len=datamodule.seq_len, num_layers=num_layers)
    schedules = [c for c in trainer.callbacks if isinstance(c, DepthSchedule)]
    if len(schedules) > 1:
        names = ", ".join(type(c).__name__ for c in schedules)
        raise UserError(f"{names} cannot be combined: each decides which layers run; keep one of them")
    active_layers_at = phase_at = None
    if schedules:
        schedule, required = schedules[0], model.required_layers()

        def active_layers_at(tau: float, step: int) -> int:
            return schedule.planned_active_layers(tau, num_layers, step, required)

        phase_at = schedule.planned_phase
    selectors = [c for c in trainer.callbacks if isinstance(c, BatchSelector)]
    if len(selectors) > 1:
        raise UserError(f"trainer.callbacks holds {len(selectors)} batch selectors: keep one")
    scored_per_trained = selectors[0].planned_scored_per_trained() if selectors else 0.0
    optimizer = model.build_optimizer()
    hessian_interval, hessian_micro_batches = None, 0
    if isinstance(optimizer, EstimatesHessian) and not optimizer.free_hessian:
        hessian_interval = optimizer.hessian_interval
        per_rank = optimizer.hessian_micro_batches or trainer.accumulate_grad_batches
        hessian_micro_batches = min(per_rank, trainer.accumulate_grad_batches) * trainer.world_size
    max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
    result = simulate(
        table,
        budget_seconds,
        micro_batch_size=datamodule.batch_size,
        micro_batches_per_step=trainer.accumulate_grad_batches * trainer.world_size,
        tokens_per_example=datamodule.tokens_per_sequence,
        optimizer_name=type(optimizer).__name__,
        num_layers=num_layers,
        active_layers_at=active_layers_at,
        phase_at=phase_at,
        max_steps=max_steps,
        scored_per_trained=scored_per_trained,
        hessian_interval=hessian_interval,
        hessian_micro_batches=hessian_micro_batches,
    )
    result["table"] = table.path
    result["world_size"] = trainer.world_size
    result["accumulate_grad_batches"] = trainer.accumulate_grad_batches
    result["optimizer"] = type(optimizer).__name__
    return result


def planned_optimizer_steps(trainer, model, datamodule) -> int | None:
    """The optimizer steps the configured run takes: ``plan_run`` against its budget clock's cost table and
    budget (``trainer.max_steps`` included), or ``trainer.max_steps`` without a clock; ``None`` when nothing
    decides it in advance (a wall-clock budget, or no budget at all)."""
    clocks = [c for c in trainer.callbacks if isinstance(c, BudgetClock)]
    max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
    if not clocks:
        return max_steps
    if clocks[0].table is None:
        return None  # wall clock: the machine decides
    return int(plan_run(trainer, model, datamodule, clocks[0].table, clocks[0].budget_seconds)["optimizer_steps"])


def passes_read(optimizer_steps: int, examples_per_step: int, batch_size: int, batches_per_pass: int) -> int:
    """Passes of a process's share of the training split that ``optimizer_steps`` steps read, each reading
    ``examples_per_step`` examples (candidates, with batch selection) in rank-batches of ``batch_size``, of
    which a pass holds ``batches_per_pass``.

    >>> passes_read(10, 16, 8, 10), passes_read(10, 16, 8, 20), passes_read(10, 16, 8, 19)
    (2, 1, 2)
    """
    batches = math.ceil(optimizer_steps * examples_per_step / batch_size)
    return max(1, math.ceil(batches / max(batches_per_pass, 1)))
