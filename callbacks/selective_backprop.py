"""Selective backprop (Jiang et al. 2019, arXiv:1910.00762; No Train No Gain section 5.1).

Every candidate is kept at random with a probability that grows with the rank of its loss among
recent losses (``core.selection.keep_probabilities``); the scoring, buffering, charging, logging and
checkpointing are ``callbacks.batch_selection.BatchSelection``'s.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from callbacks.batch_selection import SeededSelection
from core.batch_dicts import Batch
from core.errors import UserError
from core.selection import LossHistory, expected_keep_rate, keep_probabilities

__all__ = ["SelectiveBackprop"]


class SelectiveBackprop(SeededSelection):
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
        seed: seed of the keep draws (a function of seed, pass and example id); ``None`` (default): the run's
            seed (``seed_everything``; ``core/seeds.py``), resolved at setup and checked on resume.
        free_selection: do not charge the scoring forwards (the paper's ablation).
    """

    def __init__(
        self,
        beta: float = 1.0,
        history: int = 1024,
        floor: float = 0.0,
        prime_batches: int = 0,
        seed: int | None = None,
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
        self.prime_batches = int(prime_batches)
        super().__init__(seed=seed, free_selection=free_selection)

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
            kept = self.uniforms(candidates) < probabilities
        self.keep(candidates, losses, kept)
