"""Uniform batch selection: the control that selective backprop and RHO-loss must beat (Mindermann et al. 2022,
arXiv:2206.07137, whose uniform baseline this is).

Each candidate is kept with the same probability ``keep_probability``, whatever its loss, so nothing is scored
and nothing but the trained examples is charged: a run at the same budget trains the same number of examples as
the baseline, in another order (a random subset of each pass). If selective backprop or RHO-loss beats the
baseline but not this, the gain came from the reshuffled data, not from *which* examples they chose.
"""

from __future__ import annotations

import numpy as np

from callbacks.batch_selection import SeededSelection
from core.batch_dicts import Batch
from core.errors import UserError

__all__ = ["UniformSelection", "uniform_keep"]


def uniform_keep(uniforms: np.ndarray, keep_probability: float) -> np.ndarray:
    """The kept candidates: ``uniform < keep_probability`` for each (``uniforms`` from ``keep_uniforms``)."""
    return np.asarray(uniforms) < keep_probability


class UniformSelection(SeededSelection):
    """Keep each candidate with probability ``keep_probability``, independently of its loss; no scoring forward.

    Args:
        keep_probability: the chance that a candidate is trained (0 < p <= 1; 1 trains every example, as the
            baseline does).
        seed: seed of the keep draws (a function of seed, pass and example id); ``None`` (default): the run's seed.
    """

    scores_candidates = False

    def __init__(self, keep_probability: float = 0.5, seed: int | None = None) -> None:
        if not 0.0 < keep_probability <= 1.0:
            raise UserError(f"UniformSelection keep_probability={keep_probability} must be in (0, 1]")
        self.keep_probability = float(keep_probability)
        super().__init__(seed=seed, free_selection=False)

    def planned_scored_per_trained(self) -> float:
        return 0.0  # nothing is scored

    def take_in(self, candidates: Batch, losses: np.ndarray) -> None:
        self.keep(candidates, losses, uniform_keep(self.uniforms(candidates), self.keep_probability))
