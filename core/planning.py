"""``train.py plan``: simulate a configured run against a cost table, without data or training.

``plan`` charges a work ledger step by step exactly as a real run does (same micro-batches, same
active layers, same arithmetic) until the budget is spent, without data or training, and reports
steps, tokens and RST per phase. A callback that changes the depth plugs in as a
``DepthSchedule`` (``core/contracts.py``): ``planned_active_layers`` (layer dropping replays the very
draws the run will make) and ``planned_phase`` to name its phases. Batch selection plugs in as a
``BatchSelector``: ``planned_scored_per_trained`` forward-only examples are charged per trained
example (its expectation: selective backprop's keep rate is random), at the step's depth.
``planned_optimizer_steps`` and ``passes_read`` tell a run at start-up how far it will read its training
split (``RhoLoss`` checks that its irreducible losses were scored for that many passes of masks). A
callback that does work of its own (``DoesOwnWork``: an EMA update) has its ``planned_work`` charged after
each optimizer step, after the budget check of that step, as ``charged_work`` does in a callback that runs
after ``RSTBudget``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from core.contracts import BatchSelector, BudgetClock, DepthSchedule, DoesOwnWork, EstimatesHessian, SequenceSchedule
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
    own_work: Callable[[int, float], dict[str, float]] | None = None,
    work_units: dict[str, str] | None = None,
    length_at: Callable[[float], int | None] | None = None,
) -> dict[str, Any]:
    """Charge a ledger step by step as ``RSTBudget`` and the module do, until the budget is spent.

    ``active_layers_at(tau, step)`` gives the depth of each step; ``phase_at(tau)`` names its phase
    (``None`` or absent: the depth); ``scored_per_trained`` forward-only examples are charged per trained
    example (batch selection); every ``hessian_interval`` steps ``hessian_micro_batches`` micro-batches of
    Hessian passes are charged (Sophia); ``own_work(step, tau)`` gives the units of methods' own kinds of work done
    after optimizer ``step`` (``work_units``: each kind's unit); ``length_at(tau)`` the tokens per sequence of a
    step cut shorter (``None``: full length). The step that crosses the budget is executed
    (as in the paper and a real run).
    """
    ledger = WorkLedger()
    phases: list[dict[str, Any]] = []
    steps, spent = 0, 0.0
    lengths: dict[str, int] = {}
    while spent < budget_seconds and (max_steps is None or steps < max_steps):
        tau = min(1.0, spent / budget_seconds)
        layers = active_layers_at(tau, steps) if active_layers_at else num_layers
        name = (phase_at(tau) if phase_at else None) or f"{layers} layer{'s' if layers != 1 else ''}"
        before = spent
        length = length_at(tau) if length_at else None
        if length_at:
            lengths[str(length or "full")] = lengths.get(str(length or "full"), 0) + 1
        for _ in range(micro_batches_per_step):
            ledger.charge_fwd_bwd(layers, micro_batch_size, length)
            if scored_per_trained:
                ledger.charge_fwd(layers, micro_batch_size * scored_per_trained)
        ledger.charge_optimizer_step(optimizer_name)
        steps += 1
        if hessian_interval and steps % hessian_interval == 0:
            ledger.charge_hessian(layers, micro_batch_size * hessian_micro_batches, length)
        spent = table.seconds(ledger)
        for kind, amount in (own_work(steps, min(1.0, spent / budget_seconds)) if own_work else {}).items():
            ledger.charge_work(kind, amount, per=(work_units or {}).get(kind, "events"))
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
        **({"own_work": {kind: {"units": sum(n for name, n in ledger.counts.items() if name.split("/")[0] == kind),
                                "rst_seconds": table.seconds(ledger.of_kind(kind))} for kind in ledger.work_kinds()}}
           if ledger.work_kinds() else {}),
        "budget_seconds": budget_seconds,
        "stopped_by": "budget" if spent >= budget_seconds else "max_steps",
        "phases": phases,
        **({"sequence_lengths": lengths} if length_at else {}),
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
    length_at = None
    sequence_schedules = [c for c in trainer.callbacks if isinstance(c, SequenceSchedule)]
    if len(sequence_schedules) > 1:
        raise UserError(f"trainer.callbacks holds {len(sequence_schedules)} sequence-length schedules: keep one")
    if sequence_schedules:
        sequence_schedule, full_length = sequence_schedules[0], datamodule.seq_len
        table.check_lengths(sequence_schedule.lengths(full_length))

        def length_at(tau: float) -> int | None:
            length = sequence_schedule.planned_length(tau, full_length)
            return length if length < full_length else None
    workers = [c for c in trainer.callbacks if isinstance(c, DoesOwnWork)]
    work_units = {kind: unit for c in workers for kind, unit in c.work_kinds().items()}
    for kind in work_units:
        table.work(kind)  # a kind the table cannot price is refused now, in one line

    def own_work(step: int, tau: float) -> dict[str, float]:
        work: dict[str, float] = {}
        for callback in workers:
            for kind, amount in callback.planned_work(step, tau).items():
                work[kind] = work.get(kind, 0.0) + amount
        return work
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
        own_work=own_work if workers else None,
        work_units=work_units,
        length_at=length_at,
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
