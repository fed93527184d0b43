"""``train.py calibrate`` and ``train.py plan``: measure a cost table; simulate a run against one.

``calibrate`` times the configured model on this machine with a synthetic batch of the run's shape:
for every k = 1..L active layers, forward+backward and forward-only micro-batches, and one optimizer
step. Each entry: warm-up, then the median of repeated iterations with the device synchronized
around each; this is repeated in rounds that interleave the depths, and the fastest round is kept.

``plan`` charges a work ledger step by step exactly as a real run does (same micro-batches, same
active layers, same arithmetic) until the budget is spent, without data or training, and reports
steps, tokens and RST per phase. Callbacks that change the depth plug in through
``planned_active_layers(tau, num_layers, step, required) -> int`` (layer dropping replays the very
draws the run will make) and optionally ``planned_phase(tau) -> str`` to name their phases.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

from callbacks.ledger import WorkLedger
from callbacks.rst import CostTable

__all__ = ["calibrate", "plan_run", "simulate"]


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
) -> dict[str, Any]:
    """Charge a ledger step by step as ``RSTBudget`` and the module do, until the budget is spent.

    ``active_layers_at(tau, step)`` gives the depth of each step; ``phase_at(tau)`` names its phase
    (default: the depth). The step that crosses the budget is executed (as in the paper and a real run).
    """
    ledger = WorkLedger()
    phases: list[dict[str, Any]] = []
    steps, spent = 0, 0.0
    while spent < budget_seconds and (max_steps is None or steps < max_steps):
        tau = min(1.0, spent / budget_seconds)
        layers = active_layers_at(tau, steps) if active_layers_at else num_layers
        name = phase_at(tau) if phase_at else f"{layers} layer{'s' if layers != 1 else ''}"
        before = spent
        for _ in range(micro_batches_per_step):
            ledger.charge_fwd_bwd(layers, micro_batch_size)
        ledger.charge_optimizer_step(optimizer_name)
        spent = table.seconds(ledger)
        steps += 1
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
    return {
        "optimizer_steps": steps,
        "micro_batches": micro_batches,
        "examples": micro_batches * micro_batch_size,
        "tokens": micro_batches * micro_batch_size * tokens_per_example,
        "rst_seconds": spent,
        "budget_seconds": budget_seconds,
        "stopped_by": "budget" if spent >= budget_seconds else "max_steps",
        "phases": phases,
    }


def plan_run(trainer, model, datamodule, table: CostTable, budget_seconds: float) -> dict[str, Any]:
    """Simulate the configured run: its world size, accumulation, depth callbacks and optimizer."""
    num_layers = model.num_layers
    table.check_run(micro_batch_size=datamodule.batch_size, seq_len=datamodule.seq_len, num_layers=num_layers)
    planners = [c for c in trainer.callbacks if callable(getattr(c, "planned_active_layers", None))]
    active_layers_at = phase_at = None
    if planners:
        planner, required = planners[0], model.required_layers()

        def active_layers_at(tau: float, step: int) -> int:
            return planner.planned_active_layers(tau, num_layers, step, required)

        phase_at = getattr(planner, "planned_phase", None)
    optimizer = model.build_optimizer()
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
    )
    result["table"] = table.path
    result["world_size"] = trainer.world_size
    result["accumulate_grad_batches"] = trainer.accumulate_grad_batches
    result["optimizer"] = type(optimizer).__name__
    return result


# ----- calibrate ----------------------------------------------------------------------------------
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], None], device: torch.device, warmup: int, iterations: int) -> float:
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _autocast(device: torch.device, precision: str):
    if precision.startswith("bf16-mixed"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16-mixed"):
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return f"CPU {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def calibrate(
    trainer,
    model,
    datamodule,
    *,
    warmup: int = 3,
    iterations: int = 10,
    rounds: int = 3,
    progress: Callable[[str], None] = print,
) -> CostTable:
    """Measure a cost table for this configuration on this machine (see the module docstring)."""
    device = trainer.strategy.root_device
    precision = str(trainer.precision)
    if getattr(model, "float32_matmul_precision", None):  # e.g. TF32 for the paper's T5
        torch.set_float32_matmul_precision(model.float32_matmul_precision)
        precision += f" (float32 matmul: {model.float32_matmul_precision})"
    model = model.to(device)
    if precision.startswith("bf16-true"):
        model = model.to(torch.bfloat16)
    elif precision.startswith("16-true"):
        model = model.to(torch.float16)
    batch = {k: v.to(device) for k, v in datamodule.synthetic_batch(datamodule.batch_size).items()}
    optimizer = model.build_optimizer()
    autocast = _autocast(device, precision)

    def fwd_bwd() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = model.compute_loss(batch)
        loss.backward()

    def fwd() -> None:
        with autocast:
            model.per_example_loss(batch)

    model.train()
    depths = range(1, model.num_layers + 1)
    fb_rounds: dict[int, list[float]] = {k: [] for k in depths}
    f_rounds: dict[int, list[float]] = {k: [] for k in depths}
    opt_rounds: list[float] = []

    # Rounds interleave the depths, so a passing slowdown of the machine hits one round of every
    # depth rather than all iterations of one; each entry is the fastest round's median.
    for round_index in range(rounds):
        for k in depths:
            model.set_active_layers(range(k))
            fb_rounds[k].append(_median_seconds(fwd_bwd, device, warmup, iterations))
            f_rounds[k].append(_median_seconds(fwd, device, warmup, iterations))
        model.set_active_layers(None)
        fwd_bwd()  # gradients for every parameter, so the step touches all state
        opt_rounds.append(_median_seconds(optimizer.step, device, warmup, iterations))
        progress(f"  round {round_index + 1}/{rounds} done")
    fb_seconds = [min(fb_rounds[k]) for k in depths]
    f_seconds = [min(f_rounds[k]) for k in depths]
    optimizer_seconds = min(opt_rounds)
    for k in depths:
        progress(f"  {k:3d} layers: forward+backward {fb_seconds[k - 1] * 1e3:9.3f} ms, "
                 f"forward {f_seconds[k - 1] * 1e3:9.3f} ms")
    progress(f"  optimizer step ({type(optimizer).__name__}): {optimizer_seconds * 1e3:.3f} ms")
    hparams = dict(model.hparams) if hasattr(model, "hparams") else {}
    return CostTable(
        fwd_bwd_seconds=fb_seconds,
        fwd_seconds=f_seconds,
        optimizer_step_seconds={type(optimizer).__name__: optimizer_seconds},
        micro_batch_size=datamodule.batch_size,
        seq_len=datamodule.seq_len,
        machine={
            "device": _device_name(device),
            "torch": torch.__version__,
            "precision": precision,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
            "warmup": warmup,
            "iterations": iterations,
            "rounds": rounds,
            "statistic": "min over rounds of the median over iterations",
        },
        model={"class": type(model).__name__, **{k: v for k, v in hparams.items() if isinstance(v, (int, float, str))}},
    )
