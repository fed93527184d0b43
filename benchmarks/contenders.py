"""The contenders of the throughput benchmark: ways of training one model, each timed per optimizer step.

  (a) ``InTrainer``: the project's module inside the Lightning ``Trainer`` as a user runs it;
  (b) ``HandLoop`` over the same module: the floor for framework overhead;
  (c) ``HandLoop`` over the stock ``transformers`` model a user would pick instead, same dimensions.

``bert_contenders`` and ``t5_contenders`` build them on the same batches (the project's collators over
random tokens), with AdamW and gradient clipping at 0.5 (the paper's recipe).
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from typing_extensions import override

from benchmarks.flops import step_flops
from benchmarks.machine import synchronize
from core.batch import ATTENTION_MASK, INPUT_IDS, LABELS
from core.cost_table import CostTable
from core.host_memory import GLIBC_STEADY_STATE, retain_freed_memory, set_malloc_thresholds

CLIP = 0.5  # gradient clipping of every contender (the paper's recipe)


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
    def warm_up(self, count: int) -> None:
        """Have ``count`` untimed optimizer steps run before the next timed ones."""

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

    def warm_up(self, count: int) -> None:
        self.steps(count)  # now, their times dropped

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
        self.device, self._last, self._step = device, None, -1
        self.times: list[float] = []
        self.first_step_at: float | None = None

    @override
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
                 precision: str, step_seconds: float, workdir: Path, flops: float) -> None:
        self.name, self.module, self.batches, self.device = name, module, batches, device
        self.precision, self.workdir, self.flops = precision, workdir, flops
        self.warmup = 0
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

    def warm_up(self, count: int) -> None:
        self.warmup = count  # at the start of the next fit

    def steps(self, count: int) -> list[float]:
        clock, self._count = StepClock(self.device), count + self.warmup
        with quiet():
            trainer = self._trainer(clock)
        loader = torch.utils.data.DataLoader(_Batches(self.batches, self._count + 1), batch_size=None)
        with quiet():
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
def quiet() -> Iterator[None]:
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
    precisions = {"bert_trainer_fp32": "32-true", **({"bert_trainer_bf16": "bf16-mixed"} if bf16 else {})}
    for name, precision in precisions.items():  # the module's step: the hand loop's FLOPs
        contenders[name] = InTrainer(name, module, batches, device, precision, step_seconds=1.0, workdir=workdir,
                                     flops=hand.flops)
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
    trainer = InTrainer("t5_trainer_fp32", module, batches, device, "32-true", step_seconds=1.0, workdir=workdir,
                        flops=hand.flops)
    return {"t5_stock_fp32": stock, "t5_hand_fp32": hand, "t5_trainer_fp32": trainer}
