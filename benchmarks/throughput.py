"""Throughput of this project's training step against the stock ``transformers`` alternative, on this machine.

    python benchmarks/throughput.py                       # the full run: prints a table, writes BENCHMARKS.md
    python benchmarks/throughput.py --output result.json  # ... and the raw figures as JSON

In one process, interleaving the contenders in rounds (a passing slowdown of a shared machine hits
one round of each rather than all steps of one), it measures tokens/s (median over timed optimizer
steps after warm-up; the ratios between contenders pair the medians of each round and take the median
over rounds) of

  (a) the project's module (``BertMLM``, ``T5SpanCorruption``) inside the Lightning ``Trainer`` as a
      user runs it: ``RSTBudget``, ``LearningRateMonitor``, ``ModelCheckpoint``, TensorBoard logging,
      gradient clipping, the budget-progress LR schedule;
  (b) the same module's step in a hand-written PyTorch loop (the floor for framework overhead);
  (c) the stock ``transformers`` model a user would pick instead (``BertForMaskedLM`` with its
      full-vocabulary head; ``T5ForConditionalGeneration`` computing its own loss), same dimensions,
      in a hand-written loop;

each on the same batches (made by the project's collators from random tokens), with AdamW and
gradient clipping at 0.5 (the paper's recipe). It measures the float32 matrix-multiply peak in the
same run and reports model FLOP utilisation (MFU): the matrix-multiply FLOPs of one forward+backward
of that contender, counted by ``torch.utils.flop_counter`` on its own batches, per second, over the
peak. With ``bf16-mixed`` it times (a) again, where the CPU/GPU has native bf16 (else it says so and
reports the figure without a target: emulated bf16 is slower than float32).

End to end (``--fit-args``, default the README's BERT demo): ``train.py calibrate`` measures the cost
table on this machine, ``fit`` runs under the config's RST budget (``--fit-budget`` to change it) priced
by that table, with the config's
validation, logging and checkpointing, and ``calibrate`` measures again; it reports wall seconds per
optimizer step over the calibrated RST seconds per step (the mean of both tables' prices for the
fit's work), the share of step time spent waiting for the dataloader, and the seconds from the start
of ``fit`` to the first optimizer step (data from the cache).

``--tiny`` runs everything at a tiny shape in seconds (the test suite does).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import io
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count  # noqa: E402

from core.batch import ATTENTION_MASK, INPUT_IDS, LABELS  # noqa: E402
from core.cost_table import CostTable  # noqa: E402
from core.host_memory import GLIBC_STEADY_STATE, retain_freed_memory, set_malloc_thresholds  # noqa: E402

CLIP = 0.5  # gradient clipping of every contender (the paper's recipe)


# ----- shapes --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    vocab: int = 32768
    seq_len: int = 128
    batch: int = 32

    @property
    def intermediate(self) -> int:
        return 4 * self.hidden


TINY = Shape(hidden=32, layers=2, heads=2, vocab=512, seq_len=32, batch=4)


# ----- the machine ---------------------------------------------------------------------------------
def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), name)
    return f"{name}, {torch.get_num_threads()} threads"


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether matrix products in bf16 run natively, and the evidence."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"torch.cuda.is_bf16_supported() = {ok}"
    flags = sorted(f for f in cpu_flags() if "bf16" in f or f.startswith("amx") or f == "avx512f")
    ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and any("bf16" in f or f.startswith("amx") for f in flags)
    return ok, "CPU flags: " + (", ".join(flags) if flags else "no avx512_bf16/amx_bf16 (bf16 is emulated)")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, quick: bool) -> float:
    """FLOP/s of the fastest square matrix product among a few sizes (median of repeats)."""
    best = 0.0
    sizes = (256, 512) if quick else ((1024, 2048) if device.type == "cpu" else (4096, 8192))
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        synchronize(device)
        times = []
        for _ in range(3 if quick else 6):
            start = time.perf_counter()
            a @ b
            synchronize(device)
            times.append(time.perf_counter() - start)
        best = max(best, 2 * n**3 / statistics.median(times))
    return best


# ----- FLOP counting -------------------------------------------------------------------------------
def _sdpa_cpu_forward(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _flop_mapping() -> dict:
    """``torch.utils.flop_counter`` misses the fused CPU attention kernels; count them as it counts SDPA."""
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_forward
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward
    return mapping


def step_flops(loss_of: Callable[[dict], torch.Tensor], batches: list[dict]) -> float:
    """Mean matrix-multiply FLOPs of one forward+backward over ``batches`` (as executed)."""
    total = 0
    for batch in batches:
        with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter:
            loss_of(batch).backward()
        total += counter.get_total_flops()
    return total / len(batches)


# ----- batches -------------------------------------------------------------------------------------
def bert_batches(shape: Shape, count: int) -> list[dict]:
    from datamodules.mlm import MLMDataModule

    data = MLMDataModule(vocab_size=shape.vocab, seq_len=shape.seq_len, batch_size=shape.batch, mlm_probability=0.15)
    return [data.synthetic_batch(shape.batch, seed=i) for i in range(count)]


def t5_batches(shape: Shape, count: int) -> list[dict]:
    from datamodules.span_corruption import SpanCorruptionDataModule

    data = SpanCorruptionDataModule(vocab_size=shape.vocab, seq_len=shape.seq_len, batch_size=shape.batch)
    return [data.synthetic_batch(shape.batch, seed=i) for i in range(count)]


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in (INPUT_IDS, ATTENTION_MASK, LABELS) if k in batch}


# ----- contenders ----------------------------------------------------------------------------------
class Contender(ABC):
    """One way of training one model: ``steps(n)`` runs n optimizer steps and returns their wall seconds."""

    name: str
    flops: float = 0.0

    @abstractmethod
    def steps(self, count: int) -> list[float]:
        """Run ``count`` timed optimizer steps; their wall seconds."""


class HandLoop(Contender):
    """A hand-written loop: zero_grad, forward+backward, clip, AdamW step; nothing else."""

    def __init__(self, name: str, model: torch.nn.Module, loss_of: Callable[[dict], torch.Tensor],
                 optimizer: torch.optim.Optimizer, batches: list[dict], device: torch.device,
                 stock_allocator: bool = False) -> None:
        self.name, self.model, self.loss_of, self.optimizer, self.device = name, model, loss_of, optimizer, device
        self.stock_allocator = stock_allocator and device.type == "cpu"
        self.batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
        self._next = 0
        self.params = [p for p in model.parameters() if p.requires_grad]

    def steps(self, count: int) -> list[float]:
        if self.stock_allocator:  # glibc as a process without this project's setting has it
            set_malloc_thresholds(*GLIBC_STEADY_STATE)
        try:
            return self._steps(count)
        finally:
            if self.stock_allocator:
                retain_freed_memory()

    def _steps(self, count: int) -> list[float]:
        self.model.train()
        times = []
        for _ in range(count):
            batch = self.batches[self._next % len(self.batches)]
            self._next += 1
            start = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            self.loss_of(batch).backward()
            torch.nn.utils.clip_grad_norm_(self.params, CLIP)
            self.optimizer.step()
            synchronize(self.device)
            times.append(time.perf_counter() - start)
        return times


class StepClock(L.Callback):
    """Wall time between consecutive optimizer-step ends (everything the Trainer does per step)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self._last, self._step = device, [], None, -1
        self.first_step_at: float | None = None
        self.fit_start: float | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.fit_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step:
            return  # inside gradient accumulation
        self._step = trainer.global_step
        synchronize(self.device)
        now = time.perf_counter()
        if self._last is None:
            self.first_step_at = now
        else:
            self.times.append(now - self._last)
        self._last = now


class _Batches(torch.utils.data.Dataset):
    def __init__(self, batches: list[dict], length: int) -> None:
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.batches[index % len(self.batches)]


class InTrainer(Contender):
    """The module inside a Lightning ``Trainer`` with a user's callbacks, logger and checkpointing.

    Each call to ``steps`` is one ``fit`` of ``warmup + count + 1`` steps on a fresh Trainer, continuing
    from the module's weights; the first step (which builds the optimizer state) and ``warmup`` more
    (the warm-up every contender gets after another one ran) are not timed.
    """

    def __init__(self, name: str, module: L.LightningModule, batches: list[dict], device: torch.device,
                 precision: str, step_seconds: float, workdir: Path) -> None:
        self.name, self.module, self.batches, self.device = name, module, batches, device
        self.precision, self.workdir = precision, workdir
        self.warmup = 0  # set by run_rounds
        self.table = workdir / f"{name}-table.json"
        layers = module.num_layers
        # a price per micro-batch, so the budget clock runs as in a real fit (the budget itself never ends the run)
        CostTable(
            fwd_bwd_seconds=[step_seconds * (k + 1) / layers for k in range(layers)],
            fwd_seconds=[step_seconds * (k + 1) / (3 * layers) for k in range(layers)],
            optimizer_step_seconds={},
            micro_batch_size=int(batches[0][INPUT_IDS].shape[0]),
            seq_len=int(batches[0][INPUT_IDS].shape[1]),
            machine={"device": "benchmark placeholder"},
            model={},
        ).save(self.table)

    def steps(self, count: int) -> list[float]:
        clock, self._count = StepClock(self.device), count + self.warmup
        with _quiet():
            trainer = self._trainer(clock)
        loader = torch.utils.data.DataLoader(_Batches(self.batches, self._count + 1), batch_size=None)
        with _quiet():
            trainer.fit(self.module, train_dataloaders=loader)
        return clock.times[self.warmup:]  # from the end of the first step (which builds the optimizer state) on

    def _trainer(self, clock: StepClock) -> L.Trainer:
        from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
        from lightning.pytorch.loggers import TensorBoardLogger

        from callbacks.rst import RSTBudget

        return L.Trainer(
            accelerator=self.device.type,
            devices=1,
            precision=self.precision,
            max_steps=self._count + 1,
            gradient_clip_val=CLIP,
            log_every_n_steps=10,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            enable_model_summary=False,
            logger=TensorBoardLogger(self.workdir, name=self.name, default_hp_metric=False),
            callbacks=[
                RSTBudget(budget="1000h", table=str(self.table)),
                LearningRateMonitor(logging_interval="step"),
                ModelCheckpoint(dirpath=self.workdir / self.name / "checkpoints", save_last=True),
                clock,
            ],
        )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the Trainer's banners, progress bar and warnings (they still run: a user sees them)."""
    captured = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        except BaseException:
            sys.__stderr__.write(captured.getvalue())  # what went wrong, where it said so
            raise
        finally:
            logging.disable(logging.NOTSET)


# ----- building the contenders ---------------------------------------------------------------------
def bert_contenders(shape: Shape, device: torch.device, workdir: Path, bf16: bool) -> dict[str, Contender]:
    from transformers import BertConfig, BertForMaskedLM

    from lightning_modules.bert_mlm import BertMLM

    batches = bert_batches(shape, 4)
    module = BertMLM(vocab_size=shape.vocab, max_seq_len=shape.seq_len, num_layers=shape.layers,
                     hidden_size=shape.hidden, num_heads=shape.heads, intermediate_size=shape.intermediate).to(device)
    hand = HandLoop("bert_hand_fp32", module, lambda b: module.compute_loss(b)[0], module.build_optimizer(),
                    batches, device)
    stock_model = BertForMaskedLM(BertConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, intermediate_size=shape.intermediate,
        max_position_embeddings=shape.seq_len, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )).to(device)
    stock = HandLoop("bert_stock_fp32", stock_model, lambda b: stock_model(**model_inputs(b)).loss,
                     torch.optim.AdamW(stock_model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-12,
                                       weight_decay=0.01), batches, device, stock_allocator=True)
    hand.flops = step_flops(hand.loss_of, hand.batches)
    stock.flops = step_flops(stock.loss_of, stock.batches)
    contenders: dict[str, Contender] = {"bert_stock_fp32": stock, "bert_hand_fp32": hand}
    seconds = 1.0
    contenders["bert_trainer_fp32"] = InTrainer("bert_trainer_fp32", module, batches, device, "32-true", seconds, workdir)
    if bf16:
        contenders["bert_trainer_bf16"] = InTrainer("bert_trainer_bf16", module, batches, device, "bf16-mixed",
                                                    seconds, workdir)
    for name in contenders:
        if name.startswith("bert_trainer"):
            contenders[name].flops = hand.flops
    return contenders


def t5_contenders(shape: Shape, device: torch.device, workdir: Path) -> dict[str, Contender]:
    from transformers import T5ForConditionalGeneration

    from lightning_modules.t5_span_corruption import T5SpanCorruption, untie_output_head

    batches = t5_batches(shape, 4)
    module = T5SpanCorruption(vocab_size=shape.vocab, max_seq_len=shape.seq_len, num_layers=shape.layers,
                              d_model=shape.hidden, d_ff=shape.intermediate, num_heads=shape.heads,
                              d_kv=shape.hidden // shape.heads).to(device)
    hand = HandLoop("t5_hand_fp32", module, lambda b: module.compute_loss(b)[0], module.build_optimizer(),
                    batches, device)
    stock_model = T5ForConditionalGeneration(module.model.config).to(device)  # the same T5 v1.1 configuration
    untie_output_head(stock_model)
    stock = HandLoop("t5_stock_fp32", stock_model, lambda b: stock_model(**model_inputs(b)).loss,
                     torch.optim.AdamW(stock_model.parameters(), lr=1e-4), batches, device, stock_allocator=True)
    hand.flops = step_flops(hand.loss_of, hand.batches)
    stock.flops = step_flops(stock.loss_of, stock.batches)
    trainer = InTrainer("t5_trainer_fp32", module, batches, device, "32-true", 1.0, workdir)
    trainer.flops = hand.flops
    return {"t5_stock_fp32": stock, "t5_hand_fp32": hand, "t5_trainer_fp32": trainer}


def run_rounds(contenders: dict[str, Contender], rounds: int, steps: int, warmup: int, slow: set[str],
               peak: Callable[[], float], log: Callable[[str], None]) -> tuple[dict[str, list[float]], list[float]]:
    """Interleave: each round measures the matmul peak, then every contender warms up and runs ``steps``
    timed steps (``slow`` ones: one step, in the first round only). Returns the step times of each
    contender by round and the peak of each round."""
    times: dict[str, list[list[float]]] = {name: [] for name in contenders}
    peaks = []
    for round_index in range(rounds):
        peaks.append(peak())
        for name, contender in contenders.items():
            if name in slow and round_index > 0:
                continue
            if isinstance(contender, HandLoop):
                contender.steps(warmup)
            elif name not in slow:
                contender.warmup = warmup
            times[name].append(contender.steps(1 if name in slow else steps))
        log(f"  round {round_index + 1}/{rounds}: peak {peaks[-1] / 1e9:.0f} GFLOP/s; " + ", ".join(
            f"{n} {statistics.median(t[-1]) * 1e3:.0f} ms" for n, t in times.items() if t))
    return times, peaks


# ----- end to end ----------------------------------------------------------------------------------
def end_to_end(fit_args: list[str], budget: str | None, workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Calibrate the config's cost table, fit under ``budget`` priced by it, calibrate again.

    A shared machine's speed drifts by tens of per cent within minutes, and calibration keeps the fastest
    of its rounds; the fit's wall time per step is therefore compared with the mean of the prices the two
    tables, measured just before and just after it, give to the work the fit did."""
    import yaml
    from lightning.pytorch.profilers import SimpleProfiler

    import train
    from callbacks.rst import RSTBudget
    from core.durations import parse_duration

    table_path = workdir / "calibrated.json"
    log("  calibrating the cost table (train.py calibrate) ...")
    with _quiet():
        train.main(["calibrate", *fit_args, "--output", str(table_path)])
    overrides = workdir / "fit-overrides.yaml"
    overrides.write_text(yaml.safe_dump({"trainer": {"logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(workdir / "runs"), "name": "fit", "default_hp_metric": False}},
        "enable_progress_bar": False}}))
    with _quiet():
        trainer, model, datamodule = train._configured([*fit_args, "--config", str(overrides)])
    budget_callback = next(c for c in trainer.callbacks if isinstance(c, RSTBudget))
    budget_callback.table_path = str(table_path)
    if budget is not None:
        budget_callback.budget_seconds = parse_duration(budget)
    budget = budget or f"{budget_callback.budget_seconds:g}s"
    clock = StepClock(trainer.strategy.root_device)
    trainer.callbacks.append(clock)
    profiler = SimpleProfiler()
    trainer.profiler = profiler
    log(f"  fit under a budget of {budget} RST priced by that table ...")
    start = time.perf_counter()
    with _quiet():
        trainer.fit(model, datamodule=datamodule)
    end = time.perf_counter()
    steps = trainer.global_step
    wall_per_step = (end - clock.first_step_at) / (steps - 1)  # from the end of step 1 to the end of fit
    waits = profiler.recorded_durations.get("[_TrainingEpochLoop].train_dataloader_next", [])
    after_path = workdir / "calibrated-after.json"
    log("  calibrating again ...")
    with _quiet():
        train.main(["calibrate", *fit_args, "--output", str(after_path)])
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
        "fit_start_to_first_step_seconds": clock.first_step_at - start,
        "table_machine": json.loads(table_path.read_text()).get("machine"),
    }


def data_preparation(fit_args: list[str], workdir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Seconds to train the tokenizer and pack the corpus into an empty cache (the corpus download
    itself excluded: the package it comes in is copied from the default cache when there)."""
    import shutil

    import train
    from datamodules.corpora import default_cache_dir

    cache = workdir / "cold-cache"
    cache.mkdir()
    if (default_cache_dir() / "wheels").is_dir():
        shutil.copytree(default_cache_dir() / "wheels", cache / "wheels")
    with _quiet():
        _, _, datamodule = train._configured([*fit_args, "--data.init_args.cache_dir", str(cache)])
    log("  tokenizing and packing into an empty cache ...")
    start = time.perf_counter()
    with _quiet():
        datamodule.prepare_data()
        datamodule.setup("fit")
    return {"cold_cache_seconds": time.perf_counter() - start, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count()}


# ----- report --------------------------------------------------------------------------------------
def summarize(times: dict[str, list[list[float]]], peaks: list[float], contenders: dict[str, Contender],
              tokens_per_step: dict[str, int]) -> dict[str, dict[str, float]]:
    """Median step time over all timed steps; MFU against the peak measured in the same round (median over rounds)."""
    rows = {}
    for name, contender in contenders.items():
        median = statistics.median(t for round_times in times[name] for t in round_times)
        mfus = [contender.flops / statistics.median(t) / p for t, p in zip(times[name], peaks, strict=False) if t]
        rows[name] = {
            "median_step_seconds": median,
            "timed_steps": sum(len(t) for t in times[name]),
            "tokens_per_second": tokens_per_step[name.split("_")[0]] / median,
            "matmul_flops_per_step": contender.flops,
            "mfu_of_fp32_peak": statistics.median(mfus),
        }
    return rows


def paired_ratio(times: dict[str, list[list[float]]], a: str, b: str) -> float | None:
    """tokens/s of ``a`` over ``b`` (same tokens per step): the median over rounds of each round's ratio of
    median step times, so that a machine's drift between rounds (tens of per cent within minutes on a
    shared VM) cancels in each pair instead of adding to the spread."""
    if a not in times or b not in times:
        return None
    per_round = [statistics.median(tb) / statistics.median(ta)
                 for ta, tb in zip(times[a], times[b], strict=False) if ta and tb]
    return statistics.median(per_round) if per_round else None


TARGETS = {  # ratio key: (minimum, what it means)
    "bert_mfu_fp32": (0.65, "MFU of (a) in fp32, of the fp32 matmul peak"),
    "bert_trainer_vs_hand": (0.95, "(a) / (b): the framework's cost"),
    "bert_fp32_vs_stock": (2.5, "(a) / (c) in fp32 (stretch: 4x)"),
    "bert_bf16_vs_fp32": (1.5, "(a) bf16-mixed / (a) fp32, where bf16 is native"),
    "t5_fp32_vs_stock": (1.3, "(a) / (c) in fp32"),
    "t5_trainer_vs_hand": (0.95, "(a) / (b)"),
    "fit_wall_vs_calibrated": (None, "demo fit wall per step / calibrated RST per step (at most 1.10)"),
}


def verdict(key: str, value: float | None, native: bool) -> str:
    if value is None:
        return "n/a"
    if key == "fit_wall_vs_calibrated":
        return "met" if value <= 1.10 else "missed"
    if key == "bert_bf16_vs_fp32" and not native:
        return "no target (bf16 emulated)"
    return "met" if value >= TARGETS[key][0] else "missed"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/throughput.py` (never edited by hand); rerun it to measure your machine.",
        "",
        f"- date: {result['date']}",
        f"- command: `{result['command']}`",
        f"- device: {m['device']}; torch {m['torch']}; native bf16: {m['native_bf16']} ({m['bf16_evidence']})",
        "- fp32 matmul peak, measured at the start of each round (each round's MFU uses its own): "
        + ", ".join(f"{p / 1e9:,.0f}" for p in m["fp32_matmul_peak_flops_by_round"]) + " GFLOP/s",
        f"- shape: {result['shape']}; every contender trains with AdamW (T5 module: AdamWScale) and gradient clipping at 0.5",
        *([f"- host memory: this project's contenders keep freed memory in the process (`core/host_memory.py`, as "
           f"`fit` and `calibrate` run); the stock contenders run with glibc's thresholds where its own adjustment "
           f"settles (mmap {m['stock_malloc_thresholds'][0] >> 20} MiB, trim {m['stock_malloc_thresholds'][1] >> 20} MiB)"]
          if m.get("stock_malloc_thresholds") else []),
        "",
        "| contender | ms / step | tokens/s | matmul GFLOP / step | MFU |",
        "|---|---:|---:|---:|---:|",
    ]
    labels = {
        "hand": "(b) module, hand loop", "stock": "(c) stock transformers, hand loop", "trainer": "(a) module in Trainer",
    }
    for name, row in result["contenders"].items():
        model, kind, precision = name.split("_")
        lines.append(
            f"| {model.upper()} {labels[kind]}, {precision} | {row['median_step_seconds'] * 1e3:,.0f} | "
            f"{row['tokens_per_second']:,.0f} | {row['matmul_flops_per_step'] / 1e9:,.1f} | {row['mfu_of_fp32_peak']:.1%} |"
        )
    lines += ["", "Ratios of tokens/s pair each round's medians (the median over rounds of the per-round ratios), so "
              "that the machine's drift between rounds cancels.", "",
              "| ratio | value | target | |", "|---|---:|---|---|"]
    for key, value in result["ratios"].items():
        target = TARGETS[key][1]
        shown = "n/a" if value is None else f"{value:.3f}"
        lines.append(f"| `{key}` | {shown} | {target} | {verdict(key, value, m['native_bf16'])} |")
    fit = result.get("end_to_end")
    if fit:
        lines += [
            "",
            f"End to end: `train.py fit {' '.join(fit['config'])}` under {fit['budget']} RST, with `train.py calibrate` "
            f"run just before and just after it on this machine: {fit['optimizer_steps']} optimizer steps, "
            f"{fit['fit_wall_seconds_per_step'] * 1e3:.1f} ms wall per step against "
            f"{fit['calibrated_rst_seconds_per_step'] * 1e3:.1f} ms calibrated (the mean of "
            f"{fit['calibrated_rst_seconds_per_step_before'] * 1e3:.1f} ms before and "
            f"{fit['calibrated_rst_seconds_per_step_after'] * 1e3:.1f} ms after) "
            f"(validation, logging and checkpoints included); the dataloader's share of step time: "
            f"{fit['dataloader_wait_share']:.2%}; from calling `fit` to the end of the first optimizer step "
            f"(data from the cache): {fit['fit_start_to_first_step_seconds']:.2f} s.",
        ]
    data = result.get("data")
    if data:
        lines += ["", f"Data: tokenizer training and packing into an empty cache took {data['cold_cache_seconds']:.1f} s "
                  f"({data['cpu_count']} cores)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--output", help="write the figures as JSON to this file")
    parser.add_argument("--markdown", default=str(ROOT / "BENCHMARKS.md"), help="the report (default: BENCHMARKS.md)")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape and few steps (seconds; for tests)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per contender and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per contender and round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: bert, t5, bf16, fit, data")
    parser.add_argument("--fit-args", default="--config configs/bert/demo.yaml",
                        help="train.py fit arguments of the end-to-end fit, one string (default: the README demo)")
    parser.add_argument("--fit-budget", default=None,
                        help="RST budget of the end-to-end fit (default: the config's own, 150s for the demo)")
    for field in ("hidden", "layers", "heads", "vocab", "seq_len", "batch"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int)
    args = parser.parse_args(argv)
    shape = TINY if args.tiny else Shape()
    shape = replace(shape, **{k: v for k, v in vars(args).items() if k in Shape.__dataclass_fields__ and v})
    if args.tiny:
        args.rounds, args.steps = min(args.rounds, 2), min(args.steps, 2)
    skip = set(filter(None, args.skip.split(",")))
    fit_args = shlex.split(args.fit_args)
    device = torch.device(args.device)
    log = lambda text: print(text, flush=True)  # noqa: E731
    torch.manual_seed(0)
    # the project's modules keep freed host memory in the process (core/host_memory.py) once a Trainer sets
    # them up: set so for the whole run; the stock contenders run with glibc's own steady state instead
    retained = retain_freed_memory() if device.type == "cpu" else False
    native, evidence = native_bf16(device)
    log(f"device: {device_name(device)}; native bf16: {native} ({evidence})")
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"device": device_name(device), "torch": torch.__version__, "native_bf16": native,
                    "bf16_evidence": evidence,
                    "freed_memory_retained": retained,
                    "stock_malloc_thresholds": list(GLIBC_STEADY_STATE) if retained else None},
        "shape": asdict(shape),
    }
    with tempfile.TemporaryDirectory(prefix="ntng-bench-") as tmp:
        workdir = Path(tmp)
        contenders: dict[str, Contender] = {}
        if "bert" not in skip:
            contenders.update(bert_contenders(shape, device, workdir, bf16="bf16" not in skip))
        if "t5" not in skip:
            contenders.update(t5_contenders(shape, device, workdir))
        slow = set() if native else {"bert_trainer_bf16"}
        log(f"timing {', '.join(contenders)}: {args.rounds} rounds of {args.steps} steps after {args.warmup} warm-up")
        times, peaks = run_rounds(contenders, args.rounds, args.steps, args.warmup, slow,
                                  lambda: matmul_peak(device, torch.float32, quick=args.tiny), log)
        result["machine"]["fp32_matmul_peak_flops_by_round"] = peaks
        tokens = {"bert": shape.batch * shape.seq_len, "t5": shape.batch * shape.seq_len}
        rows = summarize(times, peaks, contenders, tokens)
        result["contenders"] = rows
        if "fit" not in skip:
            if "data" not in skip:
                result["data"] = data_preparation(fit_args, workdir, log)
            result["end_to_end"] = end_to_end(fit_args, args.fit_budget, workdir, log)
    fit = result.get("end_to_end")
    _ratio = functools.partial(paired_ratio, times)
    result["ratios"] = {
        "bert_fp32_vs_stock": _ratio("bert_trainer_fp32", "bert_stock_fp32"),
        "bert_bf16_vs_fp32": _ratio("bert_trainer_bf16", "bert_trainer_fp32") if native else None,
        "bert_trainer_vs_hand": _ratio("bert_trainer_fp32", "bert_hand_fp32"),
        "bert_mfu_fp32": rows["bert_trainer_fp32"]["mfu_of_fp32_peak"] if "bert_trainer_fp32" in rows else None,
        "t5_fp32_vs_stock": _ratio("t5_trainer_fp32", "t5_stock_fp32"),
        "t5_trainer_vs_hand": _ratio("t5_trainer_fp32", "t5_hand_fp32"),
        "fit_wall_vs_calibrated": fit["fit_wall_vs_calibrated"] if fit else None,
    }
    if not native and "bert_trainer_bf16" in rows:
        result["bert_bf16_vs_fp32_emulated"] = _ratio("bert_trainer_bf16", "bert_trainer_fp32")
    report = markdown(result)
    print(report)
    if args.markdown:
        Path(args.markdown).write_text(report)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
