"""Batches as dicts of tensors, cut and joined along the example dimension (batch selection's buffers).

A ``Batch`` maps the keys of ``core/batch.py`` to tensors whose first dimension is the example; every
key of a batch has the same number of rows. The batch selectors (``callbacks/batch_selection.py``)
keep the chosen rows of scored candidates, append them to what is waiting to be trained and cut
exactly one micro-batch off the front.
"""

from __future__ import annotations

import numpy as np
import torch

from core.batch import EXAMPLE_ID

__all__ = ["Batch", "concat_batches", "count_examples", "split_batch", "take_rows"]

Batch = dict[str, torch.Tensor]


def count_examples(batch: Batch | None) -> int:
    """The number of examples in ``batch`` (0 for ``None``)."""
    return 0 if batch is None else int(batch[EXAMPLE_ID].shape[0])


def concat_batches(first: Batch | None, second: Batch | None) -> Batch | None:
    """``first``'s examples, then ``second``'s; an empty or missing side returns the other unchanged."""
    if first is None or count_examples(first) == 0:
        return second
    if second is None or count_examples(second) == 0:
        return first
    return {key: torch.cat([first[key], second[key]]) for key in first}


def take_rows(batch: Batch, index: np.ndarray | torch.Tensor) -> Batch:
    """The examples of ``batch`` at the integer positions ``index``, in that order."""
    index = torch.as_tensor(np.asarray(index), dtype=torch.long)
    return {key: value[index] for key, value in batch.items()}


def split_batch(batch: Batch, n: int) -> tuple[Batch, Batch | None]:
    """The first ``n`` examples of ``batch`` and the rest (``None`` when nothing is left)."""
    head = {key: value[:n] for key, value in batch.items()}
    rest = {key: value[n:] for key, value in batch.items()} if count_examples(batch) > n else None
    return head, rest
