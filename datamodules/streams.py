"""The training stream: packed sequences in a fixed order, sharded by rank, resumable mid-epoch.

The paper reads its offline-shuffled training sequences sequentially (paper section 3; docs/paper.md "BERT"). Here the
order is the cache's (shuffled once with ``data.split_seed``) seen through the permutation of the run's order seed
(``training_order``: none for seed 0, so seed 0 reads exactly what every run read before seeds varied the order), the
same in every pass, and it is an ``IterableDataset`` so that:

- every rank of a DDP run reads a disjoint, deterministic share (rank-batch ``j`` of rank ``r`` is
  global batch ``j * world + r``), the same whatever the number of dataloader workers;
- a pass holds a whole number of optimizer steps (``batches_multiple_of`` = gradient accumulation):
  every optimizer step trains on the same number of micro-batches, as ``train.py plan`` assumes;
- a run resumed from a checkpoint taken in the middle of a pass continues with the next unseen
  batch, so its losses equal those of an uninterrupted run (a plain ``DataLoader`` would restart
  the pass from the beginning).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from core.batch import PASS_INDEX

__all__ = ["ResumableLoader", "SequentialTrainingStream", "training_order"]


def training_order(num_examples: int, order_seed: int) -> np.ndarray | None:
    """The permutation a run reads its ``num_examples`` packed training sequences through: position ``i`` of
    every pass reads the cache's row ``order[i]``.

    Seed 0: ``None``, the cache's own order (already a uniformly random permutation, drawn once with
    ``split_seed``). Any other seed: a uniformly random permutation drawn from it, so the composed order is
    again uniformly random and unrelated to seed 0's, and the cache need not be packed again per seed.
    """
    if order_seed == 0:
        return None
    return np.random.default_rng(order_seed).permutation(num_examples)


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class SequentialTrainingStream(IterableDataset):
    """Yield the examples of ``dataset`` batch by batch in ``order``, this rank's batches only.

    Args:
        dataset: a map-style dataset of packed examples.
        batch_size: examples per rank-batch (the DataLoader's batch size).
        batches_multiple_of: a pass holds a multiple of this many rank-batches (gradient accumulation).
        order: the permutation of the rows to read them through (``training_order``); ``None``: index order.

    ``start_batch`` (where the next pass starts) and ``pass_offset`` (its number; each example carries
    it, so training masks differ from pass to pass but not from run to run) are set by the loader.
    """

    def __init__(self, dataset, batch_size: int, batches_multiple_of: int = 1, order: np.ndarray | None = None) -> None:
        if order is not None and len(order) != len(dataset):
            raise ValueError(f"a training order of {len(order)} rows for a dataset of {len(dataset)}")
        self.dataset = dataset
        self.order = order
        self.batch_size = batch_size
        self.start_batch = 0
        self.pass_offset = 0
        self.batches_multiple_of = max(1, batches_multiple_of)
        self.rank, self.world = _rank_and_world()

    def capture_rank(self) -> None:
        """Record rank and world size in the main process: worker processes may not see the process group."""
        self.rank, self.world = _rank_and_world()

    def batches_per_pass(self) -> int:
        """Rank-batches in one pass: full batches on every rank, a whole number of optimizer steps."""
        batches = len(self.dataset) // (self.batch_size * self.world)
        return batches // self.batches_multiple_of * self.batches_multiple_of

    def __len__(self) -> int:
        return self.batches_per_pass() * self.batch_size

    def __iter__(self):
        # read the offsets now, not lazily in the generator: the loader resets them right after iter()
        start, self.start_batch = self.start_batch, 0
        return self._examples(start, self.pass_offset)

    def _examples(self, start: int, pass_index: int):
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for batch in range(start, self.batches_per_pass()):
            if (batch - start) % num_workers != worker_id:
                continue  # the DataLoader takes batches from its workers in turn
            first = (batch * self.world + self.rank) * self.batch_size
            if self.order is None:
                rows = self.dataset[first : first + self.batch_size]
            else:
                rows = self.dataset[self.order[first : first + self.batch_size].tolist()]
            for i in range(self.batch_size):
                yield {**{key: values[i] for key, values in rows.items()}, PASS_INDEX: pass_index}


class ResumableLoader(DataLoader):
    """A DataLoader over a ``SequentialTrainingStream`` that starts each pass where training stands.

    Args:
        stream: the ``SequentialTrainingStream``.
        position: returns how many rank-batches training has consumed so far (Lightning's
            ``batch_progress.total.processed``, restored from a checkpoint on resume). Each ``iter()``
            starts at that position's pass and batch, so a resumed run, even one Lightning restarts
            at the end of an epoch, reads exactly what an uninterrupted run would. Without it, passes
            run from the start, numbered 0, 1, 2, ...
        **kwargs: ``DataLoader`` arguments.

    Pass numbers, offsets and the rank are settled here, in the main process, because worker
    processes work on copies of the stream.
    """

    def __init__(self, stream: SequentialTrainingStream, position=None, **kwargs) -> None:
        super().__init__(stream, **kwargs)
        self.position = position
        self._next_position = 0

    def __iter__(self):
        stream = self.dataset
        stream.capture_rank()
        per_pass = max(stream.batches_per_pass(), 1)
        position = self.position() if self.position is not None else self._next_position
        stream.pass_offset, stream.start_batch = divmod(position, per_pass)
        self._next_position = (stream.pass_offset + 1) * per_pass
        iterator = super().__iter__()  # workers (if any) have copied the stream by now
        stream.start_batch = 0
        return iterator
