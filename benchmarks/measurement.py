"""The benchmark's measurements: the contenders' steps in interleaved rounds, the end-to-end fit against
its calibrated RST, and the preparation of the data into an empty cache."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from benchmarks.contenders import Contender, StepClock, quiet
from benchmarks.machine import synchronize
from core.cost_table import CostTable


def run_rounds(contenders: dict[str, Contender], rounds: int, steps: int, warmup: int, slow: set[str],
               peak: Callable[[], float], log: Callable[[str], None]) -> tuple[dict[str, list[list[float]]], list[float]]:
    """Interleave: each round measures the matmul peak, then every contender warms up and runs ``steps``
    timed steps (``slow`` ones: one step without warm-up, in the first round only). Returns the step times
    of each contender by round and the peak of each round."""
    times: dict[str, list[list[float]]] = {name: [] for name in contenders}
    peaks = []
    for round_index in range(rounds):
        peaks.append(peak())
        for name, contender in contenders.items():
            if name in slow and round_index > 0:
                continue
            contender.warm_up(0 if name in slow else warmup)
            times[name].append(contender.steps(1 if name in slow else steps))
        log(f"  round {round_index + 1}/{rounds}: peak {peaks[-1] / 1e9:.0f} GFLOP/s; " + ", ".join(
            f"{n} {statistics.median(t[-1]) * 1e3:.0f} ms" for n, t in times.items() if t))
    return times, peaks


def end_to_end(fit_args: list[str], budget: str | None, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Calibrate the config's cost table, fit under ``budget`` priced by it, calibrate again.

    A shared machine's speed drifts by tens of per cent within minutes, and calibration keeps the fastest
    of its rounds; the fit's wall time per step is therefore compared with the mean of the prices the two
    tables, measured just before and just after it, give to the work the fit did."""
    import yaml
    from lightning.pytorch.profilers import SimpleProfiler

    from callbacks.rst import RSTBudget
    from core.durations import parse_duration
    from training.calibration import CalibrationSettings, calibrate_config
    from training.lightning_cli import configured

    table_path = workdir / "calibrated.json"
    log("  calibrating the cost table (train.py calibrate) ...")
    with quiet():
        calibrate_config(fit_args, CalibrationSettings(output=str(table_path)))
    overrides = workdir / "fit-overrides.yaml"
    overrides.write_text(yaml.safe_dump({"trainer": {"logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(workdir / "runs"), "name": "fit", "default_hp_metric": False}},
        "enable_progress_bar": False}}))
    with quiet():
        trainer, model, datamodule = configured([*fit_args, "--config", str(overrides)])
    budget_callback = next(c for c in trainer.callbacks if isinstance(c, RSTBudget))
    budget_callback.table_path = str(table_path)
    if budget is not None:
        budget_callback.budget_seconds = parse_duration(budget)
    budget = budget or f"{budget_callback.budget_seconds:g}s"
    clock = StepClock(trainer.strategy.root_device)
    validation = ValidationClock(trainer.strategy.root_device)
    trainer.callbacks.extend([clock, validation])
    profiler = SimpleProfiler()
    trainer.profiler = profiler
    log(f"  fit under a budget of {budget} RST priced by that table ...")
    start = time.perf_counter()
    with quiet():
        trainer.fit(model, datamodule=datamodule)
    end = time.perf_counter()
    steps = trainer.global_step
    wall_per_step = (end - clock.first_step_at) / (steps - 1)  # from the end of step 1 to the end of fit
    waits = profiler.recorded_durations.get("[_TrainingEpochLoop].train_dataloader_next", [])
    after_path = workdir / "calibrated-after.json"
    log("  calibrating again ...")
    with quiet():
        calibrate_config(fit_args, CalibrationSettings(output=str(after_path)))
    breakdown = overhead_breakdown(profiler.recorded_durations, validation.seconds, steps, wall_per_step)
    work = model.work_done(trainer.world_size)
    before, after = (CostTable.load(path).seconds(work) / steps for path in (table_path, after_path))
    rst_per_step = (before + after) / 2
    return {
        "config": fit_args,
        "budget": budget,
        "optimizer_steps": steps,
        "calibrated_rst_seconds_per_step_before": before,
        "calibrated_rst_seconds_per_step_after": after,
        "calibrated_rst_seconds_per_step": rst_per_step,
        "fit_wall_seconds_per_step": wall_per_step,
        "fit_wall_vs_calibrated": wall_per_step / rst_per_step,
        "dataloader_wait_share": sum(waits[1:]) / sum(clock.times) if clock.times else None,
        "wall_per_step_breakdown_ms": breakdown,
        "fit_wall_vs_step": wall_per_step / (breakdown["training_step"] / 1e3),
        "fit_start_to_first_step_seconds": clock.first_step_at - start,
        "table_machine": json.loads(table_path.read_text()).get("machine"),
    }


class ValidationClock(L.Callback):
    """Wall seconds spent in validation during the fit (the device synchronised at both ends)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self._start = device, 0.0, 0.0

    @override
    def on_validation_start(self, trainer, pl_module) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    @override
    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return  # before the first step: outside the timed window
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start


def overhead_breakdown(durations: dict[str, list[float]], validation_seconds: float, steps: int,
                       wall_per_step: float) -> dict[str, float]:
    """Where the fit's wall time per optimizer step goes, in milliseconds per step, from Lightning's
    ``SimpleProfiler`` (steps 2 onwards, as the wall time per step): the training step itself (forward,
    backward, the hooks inside the optimizer's closure, the optimizer step), waiting for the dataloader,
    validation, checkpoint saves, the callbacks' and module's batch hooks outside the step (saves excluded),
    and the rest (Lightning's loop, logging and the progress bar)."""
    def total(key: str) -> float:
        return sum(durations.get(key, [])[1:])

    hooks = sum(sum(v[1:]) for k, v in durations.items()
                if k.startswith(("[Callback]", "[LightningModule]")) and k.endswith((".on_train_batch_start",
                                                                                    ".on_train_batch_end")))
    saves = sum(durations.get("save_checkpoint", []))
    parts = {"training_step": total("run_training_batch"), "dataloader_wait": total("[_TrainingEpochLoop].train_dataloader_next"),
             "validation": validation_seconds, "checkpoint_saves": saves, "batch_hooks": max(0.0, hooks - saves)}
    per_step = {name: 1e3 * seconds / max(steps - 1, 1) for name, seconds in parts.items()}
    per_step["loop_logging_and_rest"] = 1e3 * wall_per_step - sum(per_step.values())
    return per_step


def data_preparation(fit_args: list[str], workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Seconds to train the tokenizer and pack the corpus into an empty cache (the corpus download
    itself excluded: the package it comes in is copied from the default cache when there)."""
    from datamodules.corpora import default_cache_dir
    from training.lightning_cli import configured

    cache = workdir / "cold-cache"
    cache.mkdir()
    if (default_cache_dir() / "wheels").is_dir():
        shutil.copytree(default_cache_dir() / "wheels", cache / "wheels")
    with quiet():
        _, _, datamodule = configured([*fit_args, "--data.init_args.cache_dir", str(cache)])
    log("  tokenizing and packing into an empty cache ...")
    start = time.perf_counter()
    with quiet():
        datamodule.prepare_data()
        datamodule.setup("fit")
    return {"cold_cache_seconds": time.perf_counter() - start, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count()}
