"""What every pre-training LightningModule shares: optimizer, budget-progress schedule, work ledger.

Optimizers with extra needs are served here: an ``EstimatesHessian`` (``SophiaG``) gets, every ``hessian_interval``
steps, a Hessian estimate from labels sampled at the loss positions (``target_logits``) and the number of those
labels (its ``bs``); ``MuonWithAdamW`` gets the hidden weight matrices as its own group; an optimizer with
``train()``/``eval()`` modes (schedule-free) is switched to ``eval`` for validation and for the weights a checkpoint
stores. A check after backward can abandon an optimizer step (``skip_optimizer_step``, ``StepSkippingMixin``).

Subclasses (``BertMLM``, ``T5SpanCorruption``) build a ``transformers`` model in ``__init__``, register
its layer stacks with ``_init_layer_control`` and implement ``compute_loss`` (the training objective
on one batch) and ``per_example_loss``. The module implements the model-side contracts of
``core/contracts.py`` (``LayerControl``, ``PerExampleLoss``, ``ChargesWork``, ``SkipsOptimizerSteps``)
and reads budget progress from the run's ``BudgetClock``.
"""

from __future__ import annotations

import time
from abc import ABCMeta, abstractmethod
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric
from typing_extensions import override

from core.batch import INPUT_IDS
from core.contracts import BudgetClock, DepthSchedule, EstimatesHessian
from core.errors import UserError
from core.host_memory import retain_freed_memory
from core.ledger import WorkLedger
from core.seeds import run_seed
from lightning_modules.gradient_clipping import GradientClippingMixin
from lightning_modules.layer_control import LayerControlMixin
from lightning_modules.modal_optimizer import ModalOptimizerMixin
from lightning_modules.optimizers import MuonWithAdamW
from lightning_modules.parameter_groups import muon_parameter_groups, parameter_groups
from lightning_modules.schedules import LRSchedule, ScheduleName
from lightning_modules.step_skipping import StepSkippingMixin

__all__ = ["PretrainingModule"]


class PretrainingModule(LayerControlMixin, StepSkippingMixin, GradientClippingMixin, ModalOptimizerMixin, L.LightningModule,
                        metaclass=ABCMeta):
    """Base class: optimizer from the CLI, LR schedule of budget progress, ledger charges, throughput.

    Args:
        optimizer: any ``torch.optim`` class with its arguments (``class_path`` + ``init_args`` in a
            config). ``None`` uses the subclass' default. Biases and norm weights get no weight decay.
        lr_schedule: ``triangle``, ``cosine``, ``linear`` or ``constant``, a function of budget progress.
        warmup_fraction: budget fraction of the warm-up (cosine, linear, constant schedules).
        final_lr_fraction: LR multiplier at the end of the budget (cosine floor; linear end).
        warmup_start_fraction: LR multiplier at the start of the warm-up (cosine only).
        decay_fraction: budget fraction of the final decay (``wsd``).
        decay_shape: ``linear``, ``cosine`` or ``sqrt`` decay (``wsd``).
        float32_matmul_precision: ``high`` lets float32 matrix products use TF32 on GPUs that have it
            (the paper's T5 ran so); ``None`` leaves PyTorch's setting alone.
        compile_blocks: ``torch.compile`` each repeated block (BERT layer, T5 block) on its own. Layer
            stacking and dropping change which blocks run, never what one block computes, so neither
            recompiles; the first steps take longer while the blocks compile (needs a C++ compiler on a CPU).
        retain_host_memory: on a CPU, keep freed memory in the process instead of returning it to the
            kernel after every step (``core/host_memory.py``; faster CPU steps, resident memory stays at its peak).
    """

    def __init__(
        self,
        optimizer: OptimizerCallable | None = None,
        lr_schedule: ScheduleName = "triangle",
        warmup_fraction: float = 0.0,
        final_lr_fraction: float = 0.0,
        warmup_start_fraction: float = 0.0,
        decay_fraction: float = 0.2,
        decay_shape: Literal["linear", "cosine", "sqrt"] = "linear",
        float32_matmul_precision: Literal["highest", "high", "medium"] | None = None,
        compile_blocks: bool = False,
        retain_host_memory: bool = True,
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.float32_matmul_precision = float32_matmul_precision
        self.compile_blocks = compile_blocks
        self.retain_host_memory = retain_host_memory
        self._blocks_compiled = False
        # token-weighted validation loss summed over every rank's examples: the same number on 1 or N processes
        self.val_loss_mean = MeanMetric(sync_on_compute=True)
        self._precision = "32-true"  # the trainer precision the optimizer is built for (prepare_for_steps)
        try:
            self.lr_schedule = LRSchedule(
                name=lr_schedule,
                warmup_fraction=warmup_fraction,
                final=final_lr_fraction,
                warmup_start=warmup_start_fraction,
                decay_fraction=decay_fraction,
                decay_shape=decay_shape,
            )
        except ValueError as error:
            raise UserError(f"model.lr_schedule: {error}") from error
        self.work_ledger = WorkLedger()  # this process's work in this fit
        self.work_before = WorkLedger()  # the whole run's work before this fit (from a checkpoint)
        self._tokens_in_window = 0
        self._window_start: float | None = None
        self._window_step = -1
        self._hessian_batches: list[dict[str, torch.Tensor]] = []  # micro-batches of a Hessian step
        self._hessian_seed = 0
        self._shown_loss: float | None = None  # the loss of the last logging step, for the progress bar

    # ----- subclasses ---------------------------------------------------------------------------
    @abstractmethod
    def default_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """The optimizer the paper uses for this model, over ``groups``."""

    def default_weight_decay(self) -> float:
        return 0.0

    @abstractmethod
    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int | torch.Tensor]:
        """Return the mean loss over the batch's target tokens and their number (an int or a 0-d tensor,
        read only in validation, so training steps never wait for the device)."""

    @abstractmethod
    def per_example_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean loss of each example of ``batch`` (batch selection scores examples by it)."""

    @abstractmethod
    def target_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Vocabulary logits ``(M, V)`` at the M positions the training loss uses (BERT: the masked
        tokens; T5: the target tokens, never ignored ones), with gradient: Sophia samples labels there."""

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:  # tokens the model reads from ``batch``
        return int(batch[INPUT_IDS].numel())

    @override
    def setup(self, stage: str) -> None:
        self._hessian_seed = run_seed()  # Sophia's sampled labels vary with the run's seed (core/seeds.py)
        self.prepare_for_steps(self.device, str(self.trainer.precision))

    def prepare_for_steps(self, device: torch.device, precision: str = "32-true") -> None:
        """Process and model settings a step runs with, in ``fit`` as in ``calibrate``: float32 matmul
        precision, freed host memory kept on a CPU, compiled blocks; the trainer precision the optimizer
        is built for."""
        self._precision = precision
        if self.float32_matmul_precision is not None:
            torch.set_float32_matmul_precision(self.float32_matmul_precision)
        if self.retain_host_memory and device.type == "cpu":
            retain_freed_memory()
        if self.compile_blocks and not self._blocks_compiled:
            for stack in self.layer_stacks():
                for block in stack:
                    block.compile()
            self._blocks_compiled = True

    # ----- budget progress ----------------------------------------------------------------------
    def budget_clock(self) -> BudgetClock | None:
        """The run's ``BudgetClock`` callback (``RSTBudget``), or ``None`` with a step budget."""
        trainer = self._trainer
        if trainer is None:
            return None
        return next((c for c in trainer.callbacks if isinstance(c, BudgetClock)), None)

    def budget_progress(self) -> float:
        """tau in [0, 1]: from the budget clock, else ``global_step / max_steps``."""
        clock = self.budget_clock()
        if clock is not None:
            return float(clock.budget_progress())
        trainer = self._trainer
        if trainer is not None and trainer.max_steps and trainer.max_steps > 0:
            return min(1.0, trainer.global_step / trainer.max_steps)
        return 0.0

    def mixed_precision(self) -> bool:
        """Whether the trainer runs automatic mixed precision (``16-mixed``, ``bf16-mixed``)."""
        trainer = self._trainer
        precision = str(trainer.precision) if trainer is not None else self._precision
        return precision.endswith("-mixed")

    def _has_budget(self) -> bool:
        return self.budget_clock() is not None or bool(self.trainer.max_steps and self.trainer.max_steps > 0)

    # ----- optimization -------------------------------------------------------------------------
    def build_optimizer(self) -> torch.optim.Optimizer:
        """The configured optimizer over this module's parameters (no decay on biases and norm weights;
        ``MuonWithAdamW``: Muon on the hidden matrices)."""
        if self.optimizer_factory is None:
            return self.default_optimizer(parameter_groups(self, self.default_weight_decay()))
        probe = self.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
        weight_decay = probe.defaults.get("weight_decay", 0.0)
        if isinstance(probe, MuonWithAdamW):
            return self.optimizer_factory(muon_parameter_groups(self, weight_decay))
        return self.optimizer_factory(parameter_groups(self, weight_decay))

    @override
    def configure_optimizers(self):
        if self.lr_schedule.name != "constant" and not self._has_budget():
            raise UserError(
                f"the {self.lr_schedule.name!r} learning-rate schedule needs a budget to decay within: "
                "set trainer.max_steps, add an RST budget callback, or use model.lr_schedule=constant"
            )
        optimizer = self.build_optimizer()
        if isinstance(optimizer, EstimatesHessian) and str(self.trainer.precision).startswith("16"):
            raise UserError(
                f"{type(optimizer).__name__}'s Hessian passes need trainer.precision bf16-mixed or 32-true: float16 "
                "without loss scaling underflows the squared gradients (the paper's fp16 Sophia runs gave NaNs)"
            )
        schedule = LambdaLR(optimizer, lambda _: self.lr_schedule(self.budget_progress()))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": "lr"}}

    @override
    def lr_scheduler_step(self, scheduler, metric) -> None:
        """Bring the budget clock up to date (on every rank alike; a collective only where the ranks' work differs)
        before the schedule reads tau."""
        clock = self.budget_clock()
        if clock is not None:
            clock.sync(self.trainer, self)
        super().lr_scheduler_step(scheduler, metric)

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._skipping_step:  # an abandoned step (``skip_optimizer_step``) does no optimizer work
            self.work_ledger.charge_optimizer_step(type(optimizer).__name__)

    # ----- Sophia's Hessian estimate --------------------------------------------------------------
    def _hessian_estimator(self) -> EstimatesHessian | None:
        optimizers = self._trainer.optimizers if self._trainer is not None else []
        return optimizers[0] if optimizers and isinstance(optimizers[0], EstimatesHessian) else None

    @override
    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The step; then, every ``hessian_interval``-th step, Sophia's Hessian estimate on that step's
        micro-batches, before the budget clock is synced, so the step is charged with its estimate. An
        abandoned step (``skip_optimizer_step``) changes nothing and takes no estimate."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        estimator = self._hessian_estimator()
        step = self.trainer.global_step + 1  # this step, counted from 1 (Lightning counts it after this hook)
        if estimator is not None and self._hessian_batches and step % estimator.hessian_interval == 0:
            self.estimate_hessian(estimator, self._hessian_batches, step)
            self._hessian_batches = []

    @override
    def on_optimizer_step_skipped(self) -> None:
        self._hessian_batches = []  # no Hessian estimate after an abandoned step

    def sampled_label_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, int]:
        """Gauss-Newton-Bartlett: cross-entropy of the model's logits against labels sampled from its own
        softmax at the loss positions (Liu et al. 2023, Algorithm 2); and the number of positions."""
        logits = self.target_logits(batch).float()
        with torch.no_grad():
            sampled = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
        return F.cross_entropy(logits, sampled), int(sampled.numel())

    def estimate_hessian(self, optimizer: EstimatesHessian, batches: list[dict[str, torch.Tensor]], step: int) -> None:
        """One Hessian estimate over ``batches`` (the micro-batches of optimizer ``step``; Liu et al. 2023,
        Algorithms 2 and 3): each sampled-label loss divided by their number, gradients averaged over the
        processes, not clipped (clipping would shrink the estimate by (c / ||g_hat||)^2, changing rho), folded
        into the optimizer's estimate; its ``bs`` set to B, the labels sampled on all processes (the loss is a
        mean over them); charged at the forward+backward price."""
        trainer = self.trainer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer.zero_grad(set_to_none=True)
        generator = torch.Generator(device=self.device).manual_seed(hash((self._hessian_seed, step)) & 0x7FFFFFFF)
        positions = 0
        with trainer.precision_plugin.forward_context():
            for batch in batches:
                loss, labels = self.sampled_label_loss(batch, generator)
                (loss / len(batches)).backward()
                positions += labels
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            for p in params:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(trainer.world_size)
            positions = torch.tensor(float(positions), device=self.device)
            torch.distributed.all_reduce(positions)  # summed over the processes, on the device (no sync)
        optimizer.update_hessian()
        optimizer.set_batch_positions(positions)
        optimizer.zero_grad(set_to_none=True)
        for batch in batches if not optimizer.free_hessian else []:
            self.work_ledger.charge_hessian(self.num_active_layers, int(batch[INPUT_IDS].shape[0]), self.cut_length(batch))

    # ----- work ----------------------------------------------------------------------------------
    def cut_length(self, batch: dict[str, torch.Tensor]) -> int | None:
        """``batch``'s tokens per sequence if cut shorter than the data's ``seq_len`` (priced per length), else None."""
        full = getattr(getattr(self._trainer, "datamodule", None), "seq_len", 0)
        return int(batch[INPUT_IDS].shape[1]) if batch[INPUT_IDS].shape[1] < (full or 0) else None

    def work_done(self, world_size: int) -> WorkLedger:
        """The whole run's work so far: before this fit (checkpoint) plus this fit on every process.

        Under DDP this gathers every rank's counts (a collective: call it on every rank): batch
        selection scores a different number of candidates on each rank.
        """
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if world_size > 1 and distributed and torch.distributed.get_world_size() == world_size:
            gathered: list[Any] = [None] * world_size
            torch.distributed.all_gather_object(gathered, dict(self.work_ledger.counts))
            return self.work_before + WorkLedger.over_processes(gathered)
        return self.work_before + self.work_ledger.global_work(world_size)

    # ----- steps --------------------------------------------------------------------------------
    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self.compute_loss(batch)
        estimator = self._hessian_estimator()
        if estimator is not None and (self.trainer.global_step + 1) % estimator.hessian_interval == 0 and (
            estimator.hessian_micro_batches is None or len(self._hessian_batches) < estimator.hessian_micro_batches
        ):
            self._hessian_batches.append(batch)
        examples = int(batch[INPUT_IDS].shape[0])
        self.work_ledger.charge_fwd_bwd(self.num_active_layers, examples, self.cut_length(batch))
        self.log("train/loss", loss, batch_size=examples)  # not prog_bar: Lightning would read it at every step
        self._tokens_in_window += self.tokens_in(batch)
        return loss

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._window_start is None:
            self._window_start = time.perf_counter()

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """On logging steps: log Sophia's win rate and tokens/s of the whole run, averaged over each logging
        interval, and read the step's loss for the progress bar (the other steps read nothing from the device).

        Lightning's ``ThroughputMonitor`` synchronises the GPU after every micro-batch and counts time
        spent in validation; this measures training only, once per ``log_every_n_steps`` optimizer steps.
        """
        trainer = self.trainer
        step = trainer.global_step
        estimator = self._hessian_estimator()
        if step == self._window_step or step % max(trainer.log_every_n_steps, 1):
            return  # inside gradient accumulation, or not a logging step
        self._window_step = step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):  # Lightning's closure divides it by the accumulation: undo that
            self._shown_loss = float(loss) * trainer.accumulate_grad_batches  # read on logging steps only
        if estimator is not None and estimator.win_rate is not None:
            self.log("optim/sophia_win_rate", estimator.win_rate, on_step=True, on_epoch=False)
        now = time.perf_counter()
        if self._window_start is not None and now > self._window_start:
            tokens = self._tokens_in_window * trainer.world_size
            self.log("perf/tokens_per_second", tokens / (now - self._window_start), on_step=True, on_epoch=False)
        self._tokens_in_window, self._window_start = 0, now

    def progress_bar_values(self) -> dict[str, float]:
        """The progress bar's training loss: the last logging step's, a host number (no read of the device)."""
        return {} if self._shown_loss is None else {"train/loss": self._shown_loss}

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, targets = self.compute_loss(batch)
        self.val_loss_mean.update(loss.detach(), weight=torch.as_tensor(targets, dtype=torch.float32, device=loss.device))
        self.log("val/loss", self.val_loss_mean, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    @override
    def on_validation_epoch_start(self) -> None:
        self._tokens_in_window, self._window_start = 0, None  # validation time is not training throughput

    # ----- checkpoint ---------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        optimizer = self._modal_optimizer()
        if optimizer is not None and "optimizer_states" in checkpoint:  # store the eval-mode (averaged) weights
            optimizer.eval()
            checkpoint["state_dict"] = {k: v.detach().clone() for k, v in self.state_dict().items()}
            checkpoint["optimizer_states"] = [optimizer.state_dict()]
            if self.trainer.state.fn == "fit":
                optimizer.train()
        world_size = self._trainer.world_size if self._trainer is not None else 1
        checkpoint["work_ledger"] = self.work_done(world_size).state_dict()  # global: any world size can resume
        # a depth that persists (stacking) is part of the model; a per-step random draw (dropping) is not
        transient = self._trainer is not None and any(
            isinstance(c, DepthSchedule) and not c.depth_is_persistent for c in self._trainer.callbacks
        )
        checkpoint["active_layers"] = None if transient else list(self.active_layers)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.work_before = WorkLedger(checkpoint.get("work_ledger", {}))
        self.work_ledger = WorkLedger()
        active = checkpoint.get("active_layers")
        self.set_active_layers(active if active else None)
