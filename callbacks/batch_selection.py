"""Batch selection callbacks: what selective backprop and RHO-loss share (No Train No Gain, section 5).

Both score every candidate example with the model's ``per_example_loss`` (forward only, no gradient,
at the active depth, under the run's precision), keep some, and buffer the kept examples until a
full micro-batch of exactly ``data.batch_size`` exists, so every optimizer step trains the configured
batch (batch size and learning-rate semantics unchanged). The selection happens in the data path
(``core.contracts.BatchSelector``): the data module's candidate stream feeds the selector, and each
training micro-batch is assembled right before its step, so it is scored by the weights that train it.

Costs (paper section 2): every scoring forward is charged to the work ledger at the forward-only
price of the active layers; trained examples are charged forward+backward by the module as usual.
``free_selection: true`` charges nothing for scoring (the paper's "for free" ablation).

State (checkpointed, one entry per process): candidate position, the loss history, the examples
kept but not yet trained, the scored candidates of an unfinished RHO mega-batch. The keep draws are
keyed by ``(seed, pass, example_id)`` (``core.selection.keep_uniforms``), so a resumed run selects
exactly what an uninterrupted one would.

This module holds the base class, ``BatchSelection``; the methods are ``callbacks.selective_backprop.
SelectiveBackprop`` and ``callbacks.rho_loss.RhoLoss``, the maths pure functions in ``core/selection.py``.
The names this module held before it was split (``SelectiveBackprop``, ``RhoLoss``, the irreducible-loss
file and ``score_training_examples``) still import from here, so configs naming
``callbacks.batch_selection.RhoLoss`` keep loading.
"""

from __future__ import annotations

import importlib
import time
from abc import abstractmethod
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from core.batch import EXAMPLE_ID, PASS_INDEX
from core.batch_dicts import Batch, concat_batches, count_examples, split_batch, take_rows
from core.contracts import BatchSelector, PerExampleLoss
from core.errors import UserError
from core.seeds import check_resumed_seed, resolve_seed
from core.selection import PendingBatch, keep_uniforms

__all__ = ["BatchSelection", "SeededSelection"]

# the names this module held before the split, and where each lives now
_MOVED = {
    "SelectiveBackprop": "callbacks.selective_backprop",
    "RhoLoss": "callbacks.rho_loss",
    "load_irreducible_model": "callbacks.rho_loss",
    "score_training_examples": "callbacks.irreducible_scoring",
    "IRREDUCIBLE_FORMAT": "core.irreducible_losses",
    "load_irreducible_losses": "core.irreducible_losses",
    "sidecar_path": "core.irreducible_losses",
}


def __getattr__(name: str) -> Any:
    """``callbacks.batch_selection.RhoLoss`` and the other moved names, imported on first use (PEP 562;
    an import at the top would be circular: the methods import ``BatchSelection`` from here)."""
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _TrainingBatches:
    """The training loader of a selecting run: an endless stream of ``PendingBatch``."""

    def __init__(self, selector: BatchSelection) -> None:
        self.selector = selector

    def __iter__(self):
        while True:
            yield PendingBatch(self.selector)


class BatchSelection(Callback, BatchSelector):
    """The base of a batch-selection method: a subclass writes only its rule, ``take_in``.

    What it does for the subclass: reads the candidate stream (``position`` counts candidate micro-batches across
    passes; the stream ends at each pass and is reopened), scores candidates with the model's per-example loss
    (forward only, charged to the ledger at the active depth's forward-only price unless ``free_selection``),
    buffers kept examples until a micro-batch of exactly ``data.batch_size`` exists, logs ``selection/*`` curves
    and saves its per-process state (gathered across ranks) in the checkpoint, restored on resume. A rule that
    keeps state of its own extends ``_reset_state``, ``_local_state`` and ``_load_local_state``.

    Class attributes:
        scores_candidates: ``False`` for a rule that does not read losses (uniform selection): no scoring
            forward runs and none is charged; ``take_in`` receives zeros.

    Args:
        free_selection: do not charge the scoring forwards to the budget (the paper's "for free" ablation).
    """

    scores_candidates: bool = True

    def __init__(self, free_selection: bool = False) -> None:
        super().__init__()
        self.free_selection = free_selection
        self.scoring_wall_seconds = 0.0
        self._open_candidates = None
        self._batch_size = 0
        self._iterator = None
        self._trainer = None
        self._module = None
        self._restored: dict[str, Any] | None = None
        self._reset_state()
        self._reset_window()

    # ----- per-process state ------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self.candidate_batches = 0  # rank-batches read from the candidate stream
        self.ready: Batch | None = None  # kept examples waiting to be trained

    def _local_state(self) -> dict[str, Any]:
        return {"candidate_batches": self.candidate_batches, "ready": self.ready}

    def _load_local_state(self, state: dict[str, Any]) -> None:
        self.candidate_batches = int(state["candidate_batches"])
        self.ready = state.get("ready")

    def _reset_window(self) -> None:
        self._window = {"scored": 0, "kept": 0, "kept_score": 0.0, "rejected_score": 0.0, "steps": 0}
        self._last_step = -1

    # ----- subclasses ---------------------------------------------------------------------------------
    def mask_pass_period(self) -> int | None:
        """Mask pass ``p`` of the training stream like pass ``p mod period`` (``None``: every pass its own)."""
        return None

    @abstractmethod
    def take_in(self, candidates: Batch, losses: np.ndarray) -> None:
        """Decide about scored candidates: append the kept ones to ``self.ready`` (via ``keep``)."""

    # ----- the data path ------------------------------------------------------------------------------
    def training_batches(self, open_candidates, batch_size: int) -> _TrainingBatches:
        self._open_candidates, self._batch_size = open_candidates, batch_size
        self._iterator = None
        return _TrainingBatches(self)

    def assemble(self) -> Batch:
        """Score candidates until ``batch_size`` examples are kept; return them (the rest stay buffered)."""
        while count_examples(self.ready) < self._batch_size:
            candidates = self._next_candidates()
            scores = self.score(candidates) if self.scores_candidates else np.zeros(count_examples(candidates))
            self.take_in(candidates, scores)
        batch, self.ready = split_batch(self.ready, self._batch_size)
        return batch

    def _next_candidates(self) -> Batch:
        for _ in range(3):  # at most: the rest of this pass, then a fresh pass
            if self._iterator is None:
                self._iterator = self._open_candidates(self.candidate_batches, self.mask_pass_period())
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                continue
            self.candidate_batches += 1
            return batch
        raise RuntimeError("the candidate stream yields no batches")  # the data module's size check prevents this

    def score(self, candidates: Batch, model: Any = None) -> np.ndarray:
        """Per-example training loss of ``candidates`` (forward only), charged to the work ledger unless free."""
        module = self._module if model is None else model
        start = time.perf_counter()
        on_device = {key: value.to(module.device) for key, value in candidates.items()}
        forward_context = self._trainer.precision_plugin.forward_context() if self._trainer is not None else None
        with torch.no_grad():
            if forward_context is not None:
                with forward_context:
                    losses = module.per_example_loss(on_device)
            else:
                losses = module.per_example_loss(on_device)
        scores = losses.float().cpu().numpy().astype(np.float64)
        if not self.free_selection:
            self._module.work_ledger.charge_fwd(module.num_active_layers, len(scores))
            self.scoring_wall_seconds += time.perf_counter() - start
        return scores

    def keep(self, candidates: Batch, scores: np.ndarray, kept: np.ndarray) -> None:
        """Buffer ``candidates`` at the boolean mask or indices ``kept``; count them for the curves."""
        mask = np.zeros(len(scores), dtype=bool)
        mask[kept] = True
        window = self._window
        window["scored"] += len(scores)
        window["kept"] += int(mask.sum())
        window["kept_score"] += float(scores[mask].sum())
        window["rejected_score"] += float(scores[~mask].sum())
        self.ready = concat_batches(self.ready, take_rows(candidates, np.flatnonzero(mask)))

    # ----- Lightning hooks ----------------------------------------------------------------------------
    @override
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, PerExampleLoss):
            raise UserError(f"{type(self).__name__} needs a model with per_example_loss; {type(pl_module).__name__} has none")
        self._trainer, self._module = trainer, pl_module

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        self._trainer, self._module = trainer, pl_module
        self._iterator = None
        self.scoring_wall_seconds = 0.0
        self._reset_window()
        self._last_step = trainer.global_step
        if self._restored is not None:
            saved_world = int(self._restored["world_size"])
            if saved_world != trainer.world_size:
                raise UserError(
                    f"the checkpoint's batch-selection state was saved by {saved_world} process(es), this run has "
                    f"{trainer.world_size}: each process selects from its own candidates, so resume with "
                    f"{saved_world} process(es)"
                )
            self._load_local_state(self._restored["ranks"][trainer.global_rank])
            self._restored = None
        if self.free_selection:
            rank_zero_info(
                f"{type(self).__name__}: free_selection=true, scoring forwards are NOT charged to the budget "
                "(the paper's 'for free' ablation)."
            )

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # inside gradient accumulation
        self._last_step = step
        window = self._window
        window["steps"] += 1
        if step % max(trainer.log_every_n_steps, 1) or window["scored"] == 0:
            return
        rejected = window["scored"] - window["kept"]
        metrics = {
            "selection/keep_rate": window["kept"] / window["scored"],
            "selection/candidates_per_step": window["scored"] * trainer.world_size / window["steps"],
            "selection/score_kept_mean": window["kept_score"] / max(window["kept"], 1),
            "selection/score_rejected_mean": window["rejected_score"] / max(rejected, 1),
            "selection/charged": 0.0 if self.free_selection else 1.0,
        }
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=False, rank_zero_only=False)
        self._reset_window()
        self._last_step = step

    # ----- checkpoint ---------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        local = self._local_state()
        trainer = self._trainer
        world = trainer.world_size if trainer is not None else 1
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if world > 1 and distributed:  # every rank is here (Lightning dumps checkpoints on every rank)
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, local)
        else:
            gathered = [local]
        return {"world_size": len(gathered), "ranks": gathered}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)  # applied in on_train_start, once this process knows its rank


class SeededSelection(BatchSelection):
    """A batch selection with random keep draws: ``uniforms(candidates)`` gives one number in [0, 1) per candidate,
    a function of (seed, pass, example id) only (``core.selection.keep_uniforms``), so a resumed run draws what an
    uninterrupted one would. The seed is checked on resume.

    Args:
        seed: seed of the keep draws; ``None`` (default): the run's seed (``seed_everything``), resolved at setup.
        free_selection: do not charge the scoring forwards.
    """

    def __init__(self, seed: int | None = None, free_selection: bool = False) -> None:
        self.seed = None if seed is None else int(seed)
        self._keep_seed: int | None = None  # the seed resolved at setup
        super().__init__(free_selection=free_selection)

    @property
    def keep_seed(self) -> int:
        """The seed of the keep draws: ``seed``, or the run's seed (resolved at setup; before it, now)."""
        return self._keep_seed if self._keep_seed is not None else resolve_seed(self.seed)

    def uniforms(self, candidates: Batch) -> np.ndarray:
        return keep_uniforms(self.keep_seed, candidates[PASS_INDEX].tolist(), candidates[EXAMPLE_ID].tolist())

    @override
    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._keep_seed = resolve_seed(self.seed)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seed": self.keep_seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_resumed_seed(f"{type(self).__name__} seed", self.keep_seed, state_dict.get("seed"))
        super().load_state_dict(state_dict)
