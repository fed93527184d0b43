"""RHO-loss (Mindermann et al. 2022, arXiv:2206.07137; No Train No Gain section 5.2).

The score of a candidate is its training loss minus its irreducible loss, and the top of every
candidate mega-batch is trained (``core.selection.top_k_indices``). The irreducible losses come from
the file ``train.py score`` writes (``core/irreducible_losses.py``, made by
``callbacks/irreducible_scoring.py``) or from a checkpoint of the irreducible-loss model scored online
(``load_irreducible_model``). The scoring, buffering, charging, logging and checkpointing are
``callbacks.batch_selection.BatchSelection``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from callbacks.batch_selection import BatchSelection
from core.batch import EXAMPLE_ID, PASS_INDEX
from core.batch_dicts import Batch, concat_batches, count_examples, split_batch
from core.errors import UserError
from core.irreducible_losses import load_irreducible_losses
from core.planning import passes_read, planned_optimizer_steps
from core.selection import top_k_indices

__all__ = ["RhoLoss", "load_irreducible_model"]


class RhoLoss(BatchSelection):
    """RHO-loss (Mindermann et al. 2022; paper section 5.2): train on the learnable, not yet learnt examples.

    The score of a candidate is its training loss minus its irreducible loss (the loss of a model
    trained on the holdout split); of every candidate mega-batch of ``batch_size x accumulation /
    ratio`` examples (per process) the ``batch_size x accumulation`` highest are trained, ties to the
    smaller ``example_id`` (``core.selection.top_k_indices``).

    Args:
        ratio: share of each mega-batch trained (paper: 0.5, 1536 of 3072; Mindermann et al.: 0.1).
        irreducible_losses: the ``.npy`` written by ``train.py score`` (its ``.json`` sidecar beside it), scored
            with this run's masking (mask seed: the run's ``seed_everything`` unless ``data.mask_seed`` is set)
            for at least the passes the run reads: each irreducible loss is then for the very masks the example
            trains with. A run that would read more passes than the file holds is refused at start-up
            (the passes come from ``train.py plan``'s simulation of the budget, or ``trainer.max_steps``).
        allow_pass_reuse: run anyway when the run reads more passes than the file was scored for: pass ``p`` is
            then masked like pass ``p mod P`` of a file of ``P`` passes, so later passes repeat earlier masks
            while a baseline draws fresh ones every pass (a confound; warned once).
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
        allow_pass_reuse: bool = False,
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
        self.allow_pass_reuse = bool(allow_pass_reuse)
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
    @override
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
            self._check_passes(trainer, pl_module, data)
        else:
            self._model = load_irreducible_model(self.irreducible_model, pl_module)

    def _check_passes(self, trainer, pl_module, data) -> None:
        """Refuse a run that reads more passes of the training split than the file holds masks for (point 10 of
        the study design: past the scored passes RHO-loss would reuse masks the baseline draws afresh)."""
        scored = int(self._table.shape[0])
        steps = planned_optimizer_steps(trainer, pl_module, data)
        if steps is None:
            rank_zero_warn(
                f"RhoLoss: this run's optimizer steps are not known in advance (a wall-clock budget or none), so "
                f"whether it reads past the {scored} pass(es) {self.irreducible_losses} was scored for is not checked"
            )
            return
        passes = passes_read(steps, self.mega_batch, data.batch_size, data.candidate_batches_per_pass())
        if passes <= scored:
            return
        message = (
            f"RhoLoss: this run's {steps} optimizer steps read {passes} passes of the training split, but "
            f"{self.irreducible_losses} was scored for {scored}: passes {scored}+ would repeat earlier passes' masks "
            f"while the baseline draws fresh ones; score {passes} passes with `python train.py score --config <this "
            f"run's config> --config <the irreducible overlay> --ckpt_path <its checkpoint> --output "
            f"{self.irreducible_losses} --passes {passes} --seed_everything {data.training_mask_seed}`"
        )
        if not self.allow_pass_reuse:
            raise UserError(f"{message}, or set allow_pass_reuse: true")
        rank_zero_warn(f"{message}; allow_pass_reuse: true, so pass p is masked like pass p mod {scored}")

    @override
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
        self.pool = concat_batches(self.pool, candidates)
        scores = torch.as_tensor(reducible, dtype=torch.float64)
        self.pool_scores = scores if self.pool_scores is None else torch.cat([self.pool_scores, scores])
        while count_examples(self.pool) >= self.mega_batch:
            mega, self.pool = split_batch(self.pool, self.mega_batch)
            mega_scores, rest = self.pool_scores[: self.mega_batch], self.pool_scores[self.mega_batch :]
            self.pool_scores = rest if rest.numel() else None
            values = mega_scores.numpy()
            self.keep(mega, values, top_k_indices(values, mega[EXAMPLE_ID].numpy(), self.keep_per_mega))


def _seconds(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) else "an unknown number of"


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
