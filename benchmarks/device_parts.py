"""The device check's parts (``benchmarks/device_check.py``): cost tables, throughput, compile, host
synchronisations, memory; each a function of the ``Check`` returning its entry of the JSON."""

from __future__ import annotations

import contextlib
import resource
import statistics
import time
import traceback
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
import yaml
from typing_extensions import override

from benchmarks.contenders import Contender, bert_contenders, quiet, t5_contenders
from benchmarks.device_setup import (
    LR_MONITOR,
    MODELS,
    ROOT,
    SYNC_WARNING,
    WARM_STEPS,
    Check,
    baseline_callbacks,
    config_args,
    fit,
    gpu_slug,
    log,
    shipped_callbacks,
)
from benchmarks.machine import device_name, matmul_peak, synchronize
from benchmarks.measurement import run_rounds
from benchmarks.report import ratios, summarize
from benchmarks.throughput import set_up_machine
from core.host_sync import HostReadCounter, read_site


# ----- part 1: cost tables -------------------------------------------------------------------------
def shipped_optimizers(model: str) -> list[str]:
    """The optimizer class paths the configs of ``configs/<model>/`` name (the baseline's own is the module's)."""
    paths = set()
    for path in (ROOT / "configs" / model).glob("*.yaml"):
        optimizer = ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("init_args", {}).get("optimizer")
        if isinstance(optimizer, dict) and "class_path" in optimizer:
            paths.add(optimizer["class_path"])
    return sorted(paths)


def tables(check: Check) -> dict[str, Any]:
    from core.cost_table import CostTable
    from training.calibration import CalibrationSettings, calibrate_config

    slug = gpu_slug(device_name(check.device)) if check.device.type == "cuda" else "cpu"
    folder = ROOT / "configs" / "rst" if check.args.write_tables else check.workdir
    result = {}
    for model in MODELS:
        output = folder / f"{model}-{slug}-bf16.json"
        settings = CalibrationSettings(output=str(output), optimizers=",".join(shipped_optimizers(model)),
                                       **check.scale.calibration)
        log(f"  calibrating {model} in bf16-mixed into {output} ...")
        start = time.perf_counter()
        with quiet():
            calibrate_config([*config_args(check, model), "--trainer.precision", "bf16-mixed"], settings, log=log)
        table = CostTable.load(output)  # checks the seal
        result[model] = {"name": output.name, "written_to": str(output) if check.args.write_tables else None,
                         "seconds": time.perf_counter() - start,
                         "micro_batch_size": table.micro_batch_size, "seq_len": table.seq_len,
                         "fwd_bwd_seconds": table.fwd_bwd_seconds, "fwd_seconds": table.fwd_seconds,
                         "optimizer_step_seconds": table.optimizer_step_seconds,
                         "tokens_per_second": table.micro_batch_size * table.seq_len / table.fwd_bwd_seconds[-1]}
    return result


# ----- part 2: throughput --------------------------------------------------------------------------
def throughput(check: Check) -> dict[str, Any]:
    scale, device, quick = check.scale, check.device, check.args.dry_run
    machine = set_up_machine(device)
    log("  measuring the bf16 matrix-multiply peak ...")
    bf16_peak = matmul_peak(device, torch.bfloat16, quick=quick)
    shapes = scale.shapes
    contenders: dict[str, Contender] = {**bert_contenders(shapes["bert"], device, check.workdir, bf16=True),
                                        **t5_contenders(shapes["t5"], device, check.workdir)}
    slow = set() if machine["native_bf16"] else {"bert_trainer_bf16"}  # emulated bf16: one step, as throughput.py
    log(f"  timing {', '.join(contenders)}: {scale.rounds} rounds of {scale.steps} steps after {scale.warmup} warm-up")
    times, fp32_peaks = run_rounds(contenders, scale.rounds, scale.steps, scale.warmup, slow,
                                   lambda: matmul_peak(device, torch.float32, quick=quick), log)
    rows = summarize(times, fp32_peaks, contenders, {m: shapes[m].batch * shapes[m].seq_len for m in MODELS})
    for row in rows.values():
        row["mfu_of_bf16_peak"] = row["matmul_flops_per_step"] / row["median_step_seconds"] / bf16_peak
    paired = ratios(times, rows, None, machine["native_bf16"])
    del paired["fit_wall_vs_calibrated"]
    return {"shapes": {m: asdict(s) for m, s in shapes.items()}, "native_bf16": machine["native_bf16"],
            "bf16_matmul_peak_flops": bf16_peak, "fp32_matmul_peak_flops_by_round": fp32_peaks,
            "contenders": rows, "ratios": paired}


# ----- part 3: compile -----------------------------------------------------------------------------
class StepCounters(L.Callback):
    """At the start of the fit and the end of every optimizer step: the wall time (device synchronised) and
    the frames dynamo has been asked to compile so far."""

    def __init__(self, device: torch.device) -> None:
        self.device, self._step = device, -1
        self.times: list[float] = []
        self.frames: list[int] = []

    def _record(self) -> None:
        from torch._dynamo.utils import counters

        synchronize(self.device)
        self.times.append(time.perf_counter())
        self.frames.append(counters["frames"]["total"])

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record()

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step != self._step:  # the last micro-batch of an optimizer step
            self._step = trainer.global_step
            self._record()


def recompile_limit_hits() -> int:
    from torch._dynamo.utils import counters

    return sum(n for message, n in counters["unimplemented"].items() if "recompile limit" in message.lower())


def compile_variant(check: Check, name: str, compiled: bool, schedule: str) -> dict[str, Any]:
    shape, steps = check.scale.shapes["bert"], check.scale.compile_steps
    callbacks = shipped_callbacks(schedule)
    if schedule == "stacking":  # the shipped fractions, from the depth they double to the model's (16 layers: 4)
        callbacks[0]["init_args"]["initial_layers"] = shape.layers // 2 ** len(callbacks[0]["init_args"]["fractions"])
    probe, hits = StepCounters(check.device), recompile_limit_hits()
    log(f"  {name}: {steps} steps, compile_blocks {compiled}, {schedule} ...")
    start = time.perf_counter()
    with quiet():
        fit(check, "bert", f"compile-{name}", [LR_MONITOR, *callbacks], steps,
            ["--trainer.accumulate_grad_batches", "1", "--model.init_args.compile_blocks", str(compiled).lower()], [probe])
    seconds = [b - a for a, b in zip(probe.times, probe.times[1:], strict=False)][WARM_STEPS:]
    compiles = [b - a for a, b in zip(probe.frames, probe.frames[1:], strict=False)]
    steady = compiles[WARM_STEPS:]
    limit_hits = recompile_limit_hits() - hits
    return {
        "compile_blocks": compiled, "schedule": schedule, "optimizer_steps": len(compiles),
        "fit_seconds": time.perf_counter() - start, "steps_per_second": 1 / statistics.median(seconds),
        "frames_compiled": sum(compiles), "frames_compiled_after_warmup": sum(steady),
        "steps_with_compiles_after_warmup": sum(c > 0 for c in steady),
        "recompiles_per_step": sum(steady) / len(steady), "recompile_limit_hits": limit_hits,
        # a stacking boundary compiles the blocks it wakes once; compiling on most steps (or giving up) is the fault
        "recompiles_every_step": limit_hits > 0 or sum(c > 0 for c in steady) > len(steady) / 2,
    }


def compile_check(check: Check) -> dict[str, Any]:
    variants = {"eager_stacking": (False, "stacking"), "compiled_stacking": (True, "stacking"),
                "compiled_dropping": (True, "dropping")}
    result: dict[str, Any] = {name: compile_variant(check, name, *v) for name, v in variants.items()}
    result["compiled_vs_eager_steps_per_second"] = (result["compiled_stacking"]["steps_per_second"]
                                                    / result["eager_stacking"]["steps_per_second"])
    return result


# ----- part 4: host syncs --------------------------------------------------------------------------
class SyncWindows(L.Callback):
    """Name each optimizer step's windows for ``counter`` (a ``HostReadCounter``) and count the sync warnings in
    them (``showwarning``, installed where warnings are caught): from the start to the end of each micro-batch
    (forward, backward, optimizer step, LR schedule, callbacks), not the data loading between them."""

    def __init__(self, counter: HostReadCounter) -> None:
        self.counter = counter
        self.syncs: Counter = Counter()
        self.where: dict[int, Counter] = defaultdict(Counter)

    def showwarning(self, message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    file: Any = None, line: str | None = None) -> None:
        if self.counter.label is not None and SYNC_WARNING in str(message):
            self.syncs[self.counter.label] += 1
            self.where[self.counter.label][read_site(exclude=("benchmarks/",))] += 1

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.counter.label = trainer.global_step

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.counter.label = None


@contextlib.contextmanager
def cuda_sync_warnings(device: torch.device) -> Iterator[None]:
    """On a GPU, ``torch.cuda.set_sync_debug_mode("warn")`` inside: a warning at every synchronisation."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("warn")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def steady(counts: Counter, where: dict[int, Counter], steps: list[int]) -> tuple[float, dict[str, int]]:
    """The median count over ``steps`` and the ten sites that count most in them."""
    sites: Counter = sum((where[s] for s in steps), Counter())
    return float(statistics.median(counts[s] for s in steps)), dict(sites.most_common(10))


def host_syncs_of(check: Check, model: str) -> dict[str, Any]:
    from core.cost_table import CostTable

    shape, cuda = check.scale.shapes[model], check.device.type == "cuda"
    table = check.workdir / f"syncs-{model}-table.json"  # a placeholder price of every depth: table mode as a fit runs it
    CostTable(fwd_bwd_seconds=[0.1 * (k + 1) for k in range(shape.layers)], fwd_seconds=0.03,
              micro_batch_size=shape.batch, seq_len=shape.seq_len, machine={"device": "device check placeholder"},
              model={}).save(table)
    counter, steps = HostReadCounter(), check.scale.sync_steps
    probe = SyncWindows(counter)
    log(f"  {model}: {steps} optimizer steps, counting {'sync warnings and ' if cuda else ''}host reads ...")
    start = time.perf_counter()
    with quiet(), warnings.catch_warnings():  # inside quiet(), which ignores every warning
        warnings.simplefilter("always")
        warnings.showwarning = probe.showwarning
        with cuda_sync_warnings(check.device), counter:
            trainer = fit(check, model, f"syncs-{model}", baseline_callbacks(model, table), steps,
                          list(check.scale.sync_args), [probe])
    every = max(trainer.log_every_n_steps, 1)
    counted = [s for s in range(WARM_STEPS, trainer.global_step) if s % every]
    reads, read_sites = steady(counter.counts, counter.where, counted)
    result: dict[str, Any] = {
        "steps_counted": len(counted), "log_every_n_steps": every, "fit_seconds": time.perf_counter() - start,
        "counted_by": "torch.cuda.set_sync_debug_mode" if cuda else "core.host_sync.HostReadCounter",
        "host_reads_per_step": reads, "where": read_sites,
    }
    if cuda:
        result["syncs_per_step"], result["sync_where"] = steady(probe.syncs, probe.where, counted)
    else:
        result["syncs_per_step"] = reads
    return result


def host_syncs(check: Check) -> dict[str, Any]:
    return {model: host_syncs_of(check, model) for model in MODELS}


# ----- part 5: memory ------------------------------------------------------------------------------
def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int:
    """Bytes: the device's peak allocation since the last reset; on a CPU the process's peak RSS (never reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


PART_FUNCTIONS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "tables": tables, "throughput": throughput, "compile": compile_check, "host_syncs": host_syncs,
}


def run_part(check: Check, name: str, result: dict[str, Any]) -> bool:
    """Run one part into ``result[name]`` (its error instead, if it fails); whether it succeeded."""
    log(f"{name} ...")
    torch.set_float32_matmul_precision("highest")  # the process default: a part before may have set TF32
    torch.manual_seed(0)
    reset_peak_memory(check.device)
    start = time.perf_counter()
    try:
        result[name] = PART_FUNCTIONS[name](check)
    except Exception as error:  # noqa: BLE001 (recorded; the next part runs)
        traceback.print_exc()
        result[name] = {"error": f"{type(error).__name__}: {error}"}
    result["seconds"][name] = time.perf_counter() - start
    result["memory"]["peak_bytes"][name] = peak_memory(check.device)
    log(f"{name}: {'failed' if 'error' in result[name] else 'done'} in {result['seconds'][name]:.1f} s")
    return "error" not in result[name]
