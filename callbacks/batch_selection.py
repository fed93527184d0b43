"""Batch selection callbacks: selective backprop and RHO-loss (No Train No Gain, section 5).

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

The maths are pure functions in ``core/selection.py``.
"""

from __future__ import annotations

import json
import time
from abc import abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from core.batch import EXAMPLE_ID, PASS_INDEX
from core.contracts import BatchSelector, PerExampleLoss
from core.errors import UserError
from core.sealing import file_sha256, seal, verify_seal
from core.selection import (
    LossHistory,
    PassIndexedCollator,
    PendingBatch,
    expected_keep_rate,
    keep_probabilities,
    keep_uniforms,
    top_k_indices,
)

__all__ = ["IRREDUCIBLE_FORMAT", "RhoLoss", "SelectiveBackprop", "sidecar_path"]

IRREDUCIBLE_FORMAT = "irreducible-losses/1"

Batch = dict[str, torch.Tensor]


def _size(batch: Batch | None) -> int:
    return 0 if batch is None else int(batch[EXAMPLE_ID].shape[0])


def _concat(first: Batch | None, second: Batch | None) -> Batch | None:
    if first is None or _size(first) == 0:
        return second
    if second is None or _size(second) == 0:
        return first
    return {key: torch.cat([first[key], second[key]]) for key in first}


def _rows(batch: Batch, index: np.ndarray | torch.Tensor) -> Batch:
    index = torch.as_tensor(np.asarray(index), dtype=torch.long)
    return {key: value[index] for key, value in batch.items()}


def _split(batch: Batch, n: int) -> tuple[Batch, Batch | None]:
    head = {key: value[:n] for key, value in batch.items()}
    rest = {key: value[n:] for key, value in batch.items()} if _size(batch) > n else None
    return head, rest


def sidecar_path(losses_path: str | Path) -> Path:
    """The JSON beside an irreducible-loss file: ``runs/x.npy`` -> ``runs/x.json``."""
    return Path(losses_path).with_suffix(".json")


class _TrainingBatches:
    """The training loader of a selecting run: an endless stream of ``PendingBatch``."""

    def __init__(self, selector: BatchSelection) -> None:
        self.selector = selector

    def __iter__(self):
        while True:
            yield PendingBatch(self.selector)


class BatchSelection(Callback, BatchSelector):
    """What selective backprop and RHO-loss share: scoring, buffering, charging, logging, checkpoints.

    Args:
        free_selection: do not charge the scoring forwards to the budget (the paper's "for free" ablation).
    """

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
        while _size(self.ready) < self._batch_size:
            candidates = self._next_candidates()
            self.take_in(candidates, self.score(candidates))
        batch, self.ready = _split(self.ready, self._batch_size)
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
        self.ready = _concat(self.ready, _rows(candidates, np.flatnonzero(mask)))

    # ----- Lightning hooks ----------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, PerExampleLoss):
            raise UserError(f"{type(self).__name__} needs a model with per_example_loss; {type(pl_module).__name__} has none")
        self._trainer, self._module = trainer, pl_module

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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)  # applied in on_train_start, once this process knows its rank


class SelectiveBackprop(BatchSelection):
    """Selective backprop (Jiang et al. 2019; paper section 5.1): keep the examples with high losses, at random.

    Each candidate is kept with probability ``max(floor, percentile ** beta)``, where percentile is
    the share of a history of recent losses strictly below its loss, the candidate micro-batch's
    losses added to the history first (``core.selection.keep_probabilities``). With beta 1 about half
    the candidates are kept (``1 / (1 + beta)``).

    Args:
        beta: selectivity (paper: 1; larger keeps fewer).
        history: losses remembered (Jiang et al.: 1024; the paper's code: 5000).
        floor: the least keep probability of any candidate.
        prime_batches: candidate micro-batches (per process) at the start of training that are all kept;
            their losses still fill the history.
        seed: seed of the keep draws (a function of seed, pass and example id).
        free_selection: do not charge the scoring forwards (the paper's ablation).
    """

    def __init__(
        self,
        beta: float = 1.0,
        history: int = 1024,
        floor: float = 0.0,
        prime_batches: int = 0,
        seed: int = 0,
        free_selection: bool = False,
    ) -> None:
        if beta <= 0:
            raise UserError(f"SelectiveBackprop beta={beta} must be positive (the paper uses 1)")
        if history < 1:
            raise UserError(f"SelectiveBackprop history={history} must hold at least one loss (Jiang et al.: 1024)")
        if not 0.0 <= floor <= 1.0:
            raise UserError(f"SelectiveBackprop floor={floor} must be a probability in [0, 1]")
        if prime_batches < 0:
            raise UserError(f"SelectiveBackprop prime_batches={prime_batches} must be >= 0")
        self.beta, self.history_size, self.floor = float(beta), int(history), float(floor)
        self.prime_batches, self.seed = int(prime_batches), int(seed)
        super().__init__(free_selection=free_selection)

    def _reset_state(self) -> None:
        super()._reset_state()
        self.history = LossHistory(self.history_size)

    def _local_state(self) -> dict[str, Any]:
        return {**super()._local_state(), "history": self.history.state_dict()}

    def _load_local_state(self, state: dict[str, Any]) -> None:
        super()._load_local_state(state)
        restored = LossHistory.from_state(state["history"])
        self.history = LossHistory(self.history_size, restored.values())  # a changed size keeps the newest

    def planned_scored_per_trained(self) -> float:
        return 0.0 if self.free_selection else 1.0 / expected_keep_rate(self.beta, self.floor)

    def take_in(self, candidates: Batch, losses: np.ndarray) -> None:
        probabilities = keep_probabilities(losses, self.history, self.beta, self.floor)
        if self.prime_batches and self.candidate_batches <= self.prime_batches:  # the first prime_batches
            kept = np.ones(len(losses), dtype=bool)
        else:
            uniforms = keep_uniforms(self.seed, candidates[PASS_INDEX].tolist(), candidates[EXAMPLE_ID].tolist())
            kept = uniforms < probabilities
        self.keep(candidates, losses, kept)


class RhoLoss(BatchSelection):
    """RHO-loss (Mindermann et al. 2022; paper section 5.2): train on the learnable, not yet learnt examples.

    The score of a candidate is its training loss minus its irreducible loss (the loss of a model
    trained on the holdout split); of every candidate mega-batch of ``batch_size x accumulation /
    ratio`` examples (per process) the ``batch_size x accumulation`` highest are trained, ties to the
    smaller ``example_id`` (``core.selection.top_k_indices``).

    Args:
        ratio: share of each mega-batch trained (paper: 0.5, 1536 of 3072; Mindermann et al.: 0.1).
        irreducible_losses: the ``.npy`` written by ``train.py score`` (its ``.json`` sidecar beside it).
            Pass ``p`` of training is masked like pass ``p mod P`` of a file scored for ``P`` passes, so
            each irreducible loss is for the very masks the example trains with.
        irreducible_model: instead of a file, a checkpoint of the irreducible-loss model (same
            architecture) that scores every candidate online; its forwards are charged too.
        free_selection: do not charge the scoring forwards (the paper's ablation).
    """

    def __init__(
        self,
        ratio: float = 0.5,
        irreducible_losses: str | None = None,
        irreducible_model: str | None = None,
        free_selection: bool = False,
    ) -> None:
        if not 0.0 < ratio <= 1.0:
            raise UserError(f"RhoLoss ratio={ratio} must be in (0, 1], e.g. 0.5 (the paper's 1536 of 3072)")
        if (irreducible_losses is None) == (irreducible_model is None):
            raise UserError(
                "RhoLoss needs exactly one of irreducible_losses (a file from `train.py score`) or "
                "irreducible_model (a checkpoint scored online)"
            )
        self.ratio = float(ratio)
        self.irreducible_losses = irreducible_losses
        self.irreducible_model = irreducible_model
        self._table: np.ndarray | None = None  # (passes, examples)
        self._costs: dict[str, Any] = {}  # what the irreducible model cost (from the sidecar)
        self._model = None
        super().__init__(free_selection=free_selection)

    def _reset_state(self) -> None:
        super()._reset_state()
        self.pool: Batch | None = None  # scored candidates of the unfinished mega-batch
        self.pool_scores: torch.Tensor | None = None

    def _local_state(self) -> dict[str, Any]:
        return {**super()._local_state(), "pool": self.pool, "pool_scores": self.pool_scores}

    def _load_local_state(self, state: dict[str, Any]) -> None:
        super()._load_local_state(state)
        self.pool, self.pool_scores = state.get("pool"), state.get("pool_scores")

    def planned_scored_per_trained(self) -> float:
        if self.free_selection:
            return 0.0
        return (2.0 if self.irreducible_model else 1.0) / self.ratio

    def mask_pass_period(self) -> int | None:
        return int(self._table.shape[0]) if self._table is not None else None

    # ----- set-up: the irreducible losses -----------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        data = trainer.datamodule
        if getattr(data, "train_split", "train") != "train":
            raise UserError("RhoLoss selects from the training split: set data.train_split=train")
        accumulation = trainer.accumulate_grad_batches
        self.keep_per_mega = data.batch_size * accumulation
        self.mega_batch = max(self.keep_per_mega, round(self.keep_per_mega / self.ratio))
        if self.irreducible_losses is not None:
            self._table, sidecar = load_irreducible_losses(self.irreducible_losses, data.examples_fingerprint("train"))
            costs = self._costs = sidecar.get("costs", {})
            rank_zero_info(
                f"RhoLoss: irreducible losses from {self.irreducible_losses} ({self._table.shape[0]} pass(es) of masks); "
                f"its model trained for {_seconds(costs.get('training_rst_seconds'))} and scoring cost "
                f"{_seconds(costs.get('scoring_rst_seconds'))} RST-seconds, not charged to this run's budget."
            )
        else:
            self._model = load_irreducible_model(self.irreducible_model, pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if self._model is not None:
            self._model.to(pl_module.device)
        reported = {
            f"selection/irreducible_{name}_rst": float(self._costs[f"{name}_rst_seconds"])
            for name in ("training", "scoring")
            if isinstance(self._costs.get(f"{name}_rst_seconds"), (int, float))
        }
        if reported and trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics(reported, step=trainer.global_step)  # reported, not charged

    # ----- selection ----------------------------------------------------------------------------------
    def irreducible(self, candidates: Batch) -> np.ndarray:
        if self._model is not None:
            return self.score(candidates, model=self._model)
        passes = candidates[PASS_INDEX].numpy() % self._table.shape[0]
        return self._table[passes, candidates[EXAMPLE_ID].numpy()].astype(np.float64)

    def take_in(self, candidates: Batch, losses: np.ndarray) -> None:
        reducible = losses - self.irreducible(candidates)
        self.pool = _concat(self.pool, candidates)
        scores = torch.as_tensor(reducible, dtype=torch.float64)
        self.pool_scores = scores if self.pool_scores is None else torch.cat([self.pool_scores, scores])
        while _size(self.pool) >= self.mega_batch:
            mega, self.pool = _split(self.pool, self.mega_batch)
            mega_scores, rest = self.pool_scores[: self.mega_batch], self.pool_scores[self.mega_batch :]
            self.pool_scores = rest if rest.numel() else None
            values = mega_scores.numpy()
            self.keep(mega, values, top_k_indices(values, mega[EXAMPLE_ID].numpy(), self.keep_per_mega))


def _price(table, ledger) -> float | None:
    """RST of ``ledger`` by ``table``; ``None`` without a table or a forward-only price."""
    if table is None:
        return None
    try:
        return table.seconds(ledger)
    except UserError:
        return None


def _seconds(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) else "an unknown number of"


def load_irreducible_losses(path: str, expected: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """Load ``path`` (float32, ``(examples,)`` or ``(passes, examples)``) after checking its sidecar
    against this run's ``expected`` examples fingerprint; one ``UserError`` line for any mismatch."""
    remake = (
        "make it with `python train.py score --config <this run's config> --config <the irreducible overlay> "
        f"--ckpt_path last --output {path}`"
    )
    losses_file, sidecar_file = Path(path), sidecar_path(path)
    if not losses_file.exists():
        raise UserError(f"RhoLoss: no irreducible-loss file at {path}: {remake}")
    if not sidecar_file.exists():
        raise UserError(f"RhoLoss: {path} has no sidecar {sidecar_file} saying which examples it scores: {remake}")
    try:
        sidecar = json.loads(sidecar_file.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"RhoLoss: {sidecar_file} is not valid JSON ({error}): {remake}") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != IRREDUCIBLE_FORMAT:
        raise UserError(f"RhoLoss: {sidecar_file} is not an irreducible-loss sidecar ({IRREDUCIBLE_FORMAT}): {remake}")
    verify_seal(sidecar, f"RhoLoss: the sidecar {sidecar_file}", remake)
    if file_sha256(losses_file) != sidecar.get("losses_sha256"):
        raise UserError(f"RhoLoss: {path} is not the file its sidecar describes (its sha256 differs; changed or "
                        f"replaced after scoring): {remake}")
    theirs = sidecar.get("examples", {})
    what = {
        "objective": "objective",
        "source": "corpus",
        "split_seed": "split seed",
        "validation_fraction": "validation fraction",
        "holdout_fraction": "holdout fraction",
        "split": "split",
        "sequence_length": "sequence length",
        "tokenizer_sha256": "tokenizer",
        "masking": "masking (mask seed and rates)",
        "num_examples": "number of examples",
        "input_ids_sha256": "input ids",
    }
    for key, name in what.items():
        if theirs.get(key) != expected.get(key):
            raise UserError(
                f"RhoLoss: {path} was made for another {name} ({key} {theirs.get(key)!r}, this run: "
                f"{expected.get(key)!r}): rerun `train.py score` with this run's data settings"
            )
    table = np.load(losses_file, allow_pickle=False)
    if table.ndim == 1:
        table = table[None, :]
    if table.ndim != 2 or table.shape[1] != expected["num_examples"] or table.dtype != np.float32:
        raise UserError(
            f"RhoLoss: {path} holds a {table.dtype} array of shape {table.shape}, not float32 losses for "
            f"{expected['num_examples']} examples: {remake}"
        )
    if not np.isfinite(table).all():
        raise UserError(f"RhoLoss: {path} holds non-finite losses: {remake}")
    return table, sidecar


def load_irreducible_model(path: str, pl_module) -> Any:
    """The irreducible-loss model of checkpoint ``path``: the same class and shape as the trained model
    (its forwards are priced with the same cost table), frozen, in eval mode."""
    if not Path(path).exists():
        raise UserError(f"RhoLoss: no checkpoint at irreducible_model={path}")
    model = type(pl_module).load_from_checkpoint(path, map_location="cpu", weights_only=True)
    ours = sum(p.numel() for p in pl_module.parameters())
    theirs = sum(p.numel() for p in model.parameters())
    if model.num_layers != pl_module.num_layers or ours != theirs:
        raise UserError(
            f"RhoLoss: the irreducible model at {path} has {model.num_layers} layers and {theirs:,} parameters, "
            f"the trained model {pl_module.num_layers} and {ours:,}: its forwards could not be priced; use the "
            "same architecture or score it offline with `train.py score`"
        )
    model.eval().requires_grad_(False)
    return model


# ----- the irreducible-loss file (`train.py score`) ---------------------------------------------------
def score_training_examples(trainer, model, datamodule, checkpoint: str | Path, output: str | Path,
                            passes: int = 1, batch_size: int | None = None) -> dict[str, Any]:
    """Write the irreducible loss of every training example (``output``, float32) and its JSON sidecar.

    The model of ``checkpoint`` scores the *training* split (``example_id`` order) with exactly the
    training masks of passes ``0 .. passes-1`` (``data.mask_seed``; RhoLoss masks pass ``p`` like
    ``p mod passes``), forward only, under the trainer's precision. The array is ``(examples,)`` for one
    pass, ``(passes, examples)`` otherwise. The sidecar identifies the examples (corpus fingerprint,
    split seed and fractions, tokenizer hash, masking, count, input-id hash) and reports the RST of the
    irreducible model: its training (from the checkpoint's budget) and this scoring (priced with the
    config's cost table, if it has one).
    """
    from tqdm.auto import tqdm

    from core.ledger import WorkLedger

    if passes < 1:
        raise UserError(f"--passes {passes}: score at least one pass")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state["state_dict"])
    model.on_load_checkpoint(state)
    datamodule.prepare_data()
    datamodule.setup("fit")
    split = datamodule.splits["train"]
    count = len(split)
    batch_size = batch_size or datamodule.eval_batch_size
    collate = PassIndexedCollator(datamodule.make_collator(fixed=False))
    device = trainer.strategy.root_device
    model.to(device).eval()
    losses = np.zeros((passes, count), dtype=np.float32)
    start = time.perf_counter()
    with tqdm(total=passes * count, desc="Scoring training examples", unit="ex") as progress:
        for pass_index in range(passes):
            for first in range(0, count, batch_size):
                rows = split[first : first + batch_size]
                n = len(rows[EXAMPLE_ID])
                batch = collate([{**{k: v[i] for k, v in rows.items()}, PASS_INDEX: pass_index} for i in range(n)])
                on_device = {key: value.to(device) for key, value in batch.items()}
                with torch.no_grad(), trainer.precision_plugin.forward_context():
                    values = model.per_example_loss(on_device).float().cpu().numpy()
                losses[pass_index, batch[EXAMPLE_ID].numpy()] = values
                progress.update(n)
    wall = time.perf_counter() - start
    budgets = [s for key, s in state.get("callbacks", {}).items() if str(key).startswith("RSTBudget")]
    table = next((c.table for c in trainer.callbacks if type(c).__name__ == "RSTBudget" and c.mode == "table"), None)
    scoring = WorkLedger()
    scoring.charge_fwd(model.num_active_layers, passes * count)
    sidecar = {
        "format": IRREDUCIBLE_FORMAT,
        "examples": datamodule.examples_fingerprint("train"),
        "passes": passes,
        "checkpoint": str(checkpoint),
        "model": type(model).__name__,
        "active_layers": model.num_active_layers,
        "costs": {
            "training_rst_seconds": float(budgets[0]["spent_seconds"]) if budgets else None,
            "scoring_rst_seconds": _price(table, scoring),
            "scoring_wall_seconds": wall,
            "cost_table": table.path if table is not None else None,
        },
        "mean_loss": float(losses.mean()),
    }
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(output.name + ".partial.npy")
    np.save(staging, losses[0] if passes == 1 else losses)
    sidecar = seal({**sidecar, "losses_sha256": file_sha256(staging)})
    staging.replace(output)
    sidecar_path(output).write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar
