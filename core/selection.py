"""Batch selection maths, without Lightning: selective backprop's keep probabilities and RHO-loss's top-k.

Selective backprop (Jiang et al. 2019, "Accelerating Deep Learning by Focusing on the Biggest
Losers", arXiv:1910.00762; No Train No Gain section 5.1): each candidate's loss is ranked against a
history of recent losses, the batch's own losses added first; the percentile is the share of the
history *strictly* below the loss, and the example is kept with probability

    p = max(floor, percentile ** beta)

so with uniform losses and no floor the expected keep rate is ``1 / (1 + beta)`` (half at beta = 1).
The draw uses a uniform number that is a function of ``(seed, pass, example_id)``, so a candidate's
fate does not depend on the order candidates arrive in, the rank that reads it, or a resume.

RHO-loss (Mindermann et al. 2022, "Prioritized Training on Points that are Learnable, Worth
Learning, and Not Yet Learnt", arXiv:2206.07137; No Train No Gain section 5.2): the score of an
example is its training loss minus its irreducible loss (the loss of a model trained on held-out
data); the top ``k`` of a candidate mega-batch are kept, ties broken by the smaller ``example_id``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from core.batch import PASS_INDEX

__all__ = [
    "LossHistory",
    "PassIndexedCollator",
    "PendingBatch",
    "expected_keep_rate",
    "keep_probabilities",
    "keep_uniforms",
    "strict_percentiles",
    "top_k_indices",
]


class PendingBatch:
    """A training micro-batch that a batch selector assembles when training is ready for it.

    The data loader hands these out (Lightning fetches one batch ahead); the data module turns each
    into real tensors in ``on_before_batch_transfer``, right before its training step, so every
    selection is scored with the weights of the step that trains it and a checkpoint never holds a
    batch that was scored but not trained.
    """

    __slots__ = ("source",)

    def __init__(self, source) -> None:
        self.source = source

    def assemble(self):
        return self.source.assemble()


class LossHistory:
    """The last ``size`` per-example losses (Jiang et al.: 1024; the paper's code: 5000)."""

    def __init__(self, size: int, values: Iterable[float] = ()) -> None:
        if size < 1:
            raise ValueError(f"a loss history holds at least one loss, got size={size}")
        self.size = size
        self._values: deque[float] = deque((float(v) for v in values), maxlen=size)

    def add(self, losses: Iterable[float]) -> None:
        self._values.extend(float(v) for v in losses)

    def values(self) -> np.ndarray:
        return np.fromiter(self._values, dtype=np.float64, count=len(self._values))

    def __len__(self) -> int:
        return len(self._values)

    def state_dict(self) -> dict:
        return {"size": self.size, "values": list(self._values)}

    @classmethod
    def from_state(cls, state: dict) -> LossHistory:
        return cls(int(state["size"]), state.get("values", ()))


def strict_percentiles(losses: Sequence[float], history: np.ndarray) -> np.ndarray:
    """For each loss, the share of ``history`` strictly below it, in [0, 1)."""
    ordered = np.sort(np.asarray(history, dtype=np.float64))
    if ordered.size == 0:
        raise ValueError("the loss history is empty: add the batch's losses before ranking them")
    below = np.searchsorted(ordered, np.asarray(losses, dtype=np.float64), side="left")
    return below / ordered.size


def keep_probabilities(losses: Sequence[float], history: LossHistory, beta: float, floor: float = 0.0) -> np.ndarray:
    """Add ``losses`` to ``history`` (first), then ``max(floor, percentile ** beta)`` for each."""
    history.add(losses)
    return np.maximum(floor, strict_percentiles(losses, history.values()) ** beta)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele et al. 2014): a well-mixed 64-bit hash of each 64-bit input."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def keep_uniforms(seed: int, pass_index: Sequence[int], example_ids: Sequence[int]) -> np.ndarray:
    """One uniform number in [0, 1) per example, a function of ``(seed, pass, example_id)`` only."""
    ids = np.asarray(example_ids, dtype=np.int64).astype(np.uint64)
    passes = np.asarray(pass_index, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = _splitmix64(_splitmix64(ids ^ (passes << np.uint64(40))) ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF))
    return (key >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def expected_keep_rate(beta: float, floor: float = 0.0) -> float:
    """E[max(floor, u ** beta)] for u uniform in [0, 1): the long-run share of candidates kept.

    ``floor`` up to ``u = floor ** (1 / beta)``, then ``u ** beta``:
    ``floor ** (1 + 1/beta) + (1 - floor ** (1 + 1/beta)) / (1 + beta)``; ``1 / (1 + beta)`` without a floor.
    """
    if beta <= 0:
        raise ValueError(f"beta={beta} must be positive")
    knee = floor ** (1.0 + 1.0 / beta) if floor > 0 else 0.0
    return knee + (1.0 - knee) / (1.0 + beta)


def top_k_indices(scores: Sequence[float], example_ids: Sequence[int], k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores; equal scores are ordered by the smaller example id.

    The result lists the chosen indices in their original (candidate) order.
    """
    scores = np.asarray(scores, dtype=np.float64)
    ids = np.asarray(example_ids, dtype=np.int64)
    if not 0 <= k <= scores.size:
        raise ValueError(f"cannot keep {k} of {scores.size} candidates")
    order = np.lexsort((ids, -scores))  # primary key: score descending; ties: id ascending
    return np.sort(order[:k])


class PassIndexedCollator:
    """Wrap a training collator: add each example's pass (``PASS_INDEX``) to the batch, and mask pass ``p``
    like pass ``p mod mask_pass_period`` when a period is given."""

    def __init__(self, collate, mask_pass_period: int | None = None) -> None:
        self.collate = collate
        self.mask_pass_period = mask_pass_period

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        import torch

        passes = [int(e[PASS_INDEX]) for e in examples]
        if self.mask_pass_period:
            examples = [{**e, PASS_INDEX: p % self.mask_pass_period} for e, p in zip(examples, passes, strict=True)]
        batch = self.collate(examples)
        batch[PASS_INDEX] = torch.as_tensor(passes, dtype=torch.long)
        return batch
