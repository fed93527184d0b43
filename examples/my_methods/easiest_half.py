"""An example batch-selection rule written against the toolkit's public base class: train on the easier half.

The opposite of selective backprop (which prefers high losses): of each candidate micro-batch, keep the
examples whose loss is at most the candidates' median. Everything else (reading the candidate stream,
scoring and charging the scoring forwards, buffering exact micro-batches, logging, checkpoints across ranks
and resume) is ``callbacks.batch_selection.BatchSelection``'s. It is a worked example of the extension
surface, not a method the toolkit recommends.
"""

from __future__ import annotations

import numpy as np

from callbacks.batch_selection import BatchSelection
from core.batch_dicts import Batch


def easiest_half(losses: np.ndarray) -> np.ndarray:
    """The kept candidates: a loss at most the median of the candidates' losses."""
    return np.asarray(losses) <= np.median(losses)


class EasiestHalf(BatchSelection):
    """Keep the candidates whose loss is at most their micro-batch's median (about half of them)."""

    def planned_scored_per_trained(self) -> float:
        """For ``train.py plan``: every trained example costs about two scored ones."""
        return 0.0 if self.free_selection else 2.0

    def take_in(self, candidates: Batch, losses: np.ndarray) -> None:
        self.keep(candidates, losses, easiest_half(losses))
