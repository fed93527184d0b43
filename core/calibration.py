"""``train.py calibrate``: measure a cost table for a model on the machine it runs on.

For every k = 1..L active layers the model's forward+backward and forward-only micro-batches are
timed on a synthetic batch of the run's shape, and one optimizer step. Each entry: warm-up, then the
median of repeated iterations with the device synchronized around each; this is repeated in rounds
that interleave the depths (a passing slowdown of the machine hits one round of every depth rather
than all iterations of one), and each entry keeps the median of its rounds: the price of a sustained
step, as a fit runs it (the fastest round priced steps about 7 % below what a fit sustains on a shared VM).
"""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from core.cost_table import CostTable

__all__ = ["calibrate", "time_fwd_bwd_by_length", "time_optimizer_steps"]


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


def _mean_seconds(fn: Callable[[], None], device: torch.device, warmup: int, iterations: int) -> float:
    """Mean over ``iterations``: right for work whose cost comes in periodic bursts (SOAP's preconditioner)."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    _synchronize(device)
    return (time.perf_counter() - start) / iterations


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
    model: Any,
    batch: dict[str, torch.Tensor],
    *,
    device: torch.device,
    precision: str,
    seq_len: int,
    warmup: int = 3,
    iterations: int = 10,
    rounds: int = 3,
    progress: Callable[[str], None] = print,
    extra_optimizers: Sequence[Callable[[], Any]] = (),
) -> CostTable:
    """Measure a cost table for ``model`` on ``batch`` (one micro-batch of the run's shape) on ``device``.

    ``model`` offers layer control, ``compute_loss``, ``per_example_loss`` and ``build_optimizer``;
    ``precision`` is Lightning's precision string (``32-true``, ``bf16-mixed``, ...).
    ``extra_optimizers``: functions that build further optimizers over the model, whose step is timed
    too (a table then prices runs with any of them).
    """
    precision = trainer_precision = str(precision)
    if getattr(model, "float32_matmul_precision", None):  # e.g. TF32 for the paper's T5
        precision += f" (float32 matmul: {model.float32_matmul_precision})"
    model = model.to(device)
    if hasattr(model, "prepare_for_steps"):  # the settings fit runs the step with (matmul precision, memory, compile)
        model.prepare_for_steps(device, trainer_precision)
    if precision.startswith("bf16-true"):
        model = model.to(torch.bfloat16)
    elif precision.startswith("16-true"):
        model = model.to(torch.float16)
    micro_batch_size = int(next(iter(batch.values())).shape[0])
    batch = {k: v.to(device) for k, v in batch.items()}
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

    for round_index in range(rounds):
        for k in depths:
            model.set_active_layers(range(k))
            fb_rounds[k].append(_median_seconds(fwd_bwd, device, warmup, iterations))
            f_rounds[k].append(_median_seconds(fwd, device, warmup, iterations))
        model.set_active_layers(None)
        fwd_bwd()  # gradients for every parameter, so the step touches all state
        opt_rounds.append(_median_seconds(optimizer.step, device, warmup, iterations))
        progress(f"  round {round_index + 1}/{rounds} done")
    fb_seconds = [statistics.median(fb_rounds[k]) for k in depths]
    f_seconds = [statistics.median(f_rounds[k]) for k in depths]
    optimizer_seconds = {type(optimizer).__name__: statistics.median(opt_rounds)}
    for k in depths:
        progress(f"  {k:3d} layers: forward+backward {fb_seconds[k - 1] * 1e3:9.3f} ms, "
                 f"forward {f_seconds[k - 1] * 1e3:9.3f} ms")
    optimizer_seconds.update(
        time_optimizer_steps(model, fwd_bwd, extra_optimizers, device, warmup, iterations, rounds)
    )
    for name, seconds in optimizer_seconds.items():
        progress(f"  optimizer step ({name}): {seconds * 1e3:.3f} ms")
    hparams = dict(model.hparams) if hasattr(model, "hparams") else {}
    return CostTable(
        fwd_bwd_seconds=fb_seconds,
        fwd_seconds=f_seconds,
        optimizer_step_seconds=optimizer_seconds,
        micro_batch_size=micro_batch_size,
        seq_len=seq_len,
        machine={
            "device": _device_name(device),
            "torch": torch.__version__,
            "precision": precision,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
            "warmup": warmup,
            "iterations": iterations,
            "rounds": rounds,
            "statistic": "median over rounds of the median over iterations",
        },
        model={"class": type(model).__name__, **{k: v for k, v in hparams.items() if isinstance(v, (int, float, str))}},
    )


def time_optimizer_steps(
    model: Any,
    make_gradients: Callable[[], None],
    builders: Sequence[Callable[[], Any]],
    device: torch.device,
    warmup: int = 3,
    iterations: int = 10,
    rounds: int = 3,
) -> dict[str, float]:
    """Seconds of one step of each optimizer ``builders`` make over ``model`` (median over rounds of the mean
    over ``iterations`` steps, so a periodic cost such as SOAP's preconditioner update is amortised: use at
    least its period), after ``make_gradients()`` (a forward+backward at full depth) fills every gradient."""
    model.set_active_layers(None)
    result: dict[str, float] = {}
    for build in builders:
        optimizer = build()
        make_gradients()
        result[type(optimizer).__name__] = statistics.median(
            _mean_seconds(optimizer.step, device, warmup, iterations) for _ in range(rounds)
        )
        del optimizer
    return result


def time_fwd_bwd_by_length(
    model: Any,
    batches: dict[int, dict[str, torch.Tensor]],
    *,
    device: torch.device,
    precision: str,
    warmup: int = 3,
    iterations: int = 10,
    rounds: int = 3,
) -> dict[int, list[float]]:
    """Seconds of a forward+backward micro-batch at every depth for each length's ``batches[n]`` (a batch of the
    run's shape with its sequences cut to ``n`` tokens): the prices of sequence-length warm-up. Timed as
    ``calibrate`` times the full length (rounds interleave the lengths and depths; median over rounds)."""
    model = model.to(device)
    if hasattr(model, "prepare_for_steps"):
        model.prepare_for_steps(device, str(precision))
    autocast = _autocast(device, str(precision))
    optimizer = model.build_optimizer()
    model.train()
    depths = range(1, model.num_layers + 1)
    on_device = {n: {k: v.to(device) for k, v in b.items()} for n, b in batches.items()}
    measured: dict[int, dict[int, list[float]]] = {n: {k: [] for k in depths} for n in batches}
    for _ in range(rounds):
        for n, batch in on_device.items():
            for k in depths:
                model.set_active_layers(range(k))

                def fwd_bwd(batch=batch) -> None:
                    optimizer.zero_grad(set_to_none=True)
                    with autocast:
                        loss, _ = model.compute_loss(batch)
                    loss.backward()

                measured[n][k].append(_median_seconds(fwd_bwd, device, warmup, iterations))
    model.set_active_layers(None)
    return {n: [statistics.median(measured[n][k]) for k in depths] for n in sorted(batches)}
