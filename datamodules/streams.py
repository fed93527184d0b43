"""The training stream: packed sequences in a fixed order, sharded by rank, resumable mid-epoch.

The paper reads its offline-shuffled training sequences sequentially (PAPER.md 5.1). Here that
order is an ``IterableDataset`` so that:

- every rank of a DDP run reads a disjoint, deterministic share (rank-batch ``j`` of rank ``r`` is
  global batch ``j * world + r``), the same whatever the number of dataloader workers;
- a run resumed from a checkpoint taken in the middle of a pass over the data continues with the
  next unseen batch, so its losses equal those of an uninterrupted run (a plain ``DataLoader``
  would restart the pass from the beginning).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

__all__ = ["ResumableLoader", "SequentialTrainingStream"]


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class SequentialTrainingStream(IterableDataset):
    """Yield the examples of ``dataset`` batch by batch in index order, this rank's batches only.

    Args:
        dataset: a map-style dataset of packed examples.
        batch_size: examples per rank-batch (the DataLoader's batch size).
        start_batch: rank-batch index at which the next pass starts (then 0 for later passes).
        pass_index: number of the first pass (each example carries its pass number, so training masks
            differ from pass to pass but not from run to run).
    """

    def __init__(self, dataset, batch_size: int, start_batch: int = 0, pass_index: int = 0) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.start_batch = start_batch
        self.pass_offset = pass_index

    def batches_per_pass(self) -> int:
        """Full rank-batches in one pass over the data (the tail that fills no batch on every rank is dropped)."""
        _, world = _rank_and_world()
        return len(self.dataset) // (self.batch_size * world)

    def __len__(self) -> int:
        return self.batches_per_pass() * self.batch_size

    def __iter__(self):
        # read the offsets now, not lazily in the generator: the loader resets them right after iter()
        per_pass = max(self.batches_per_pass(), 1)
        pass_index, start = divmod(self.start_batch, per_pass)
        self.start_batch = 0
        return self._examples(start, self.pass_offset + pass_index)

    def _examples(self, start: int, pass_index: int):
        rank, world = _rank_and_world()
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for batch in range(start, self.batches_per_pass()):
            if (batch - start) % num_workers != worker_id:
                continue  # the DataLoader takes batches from its workers in turn
            first = (batch * world + rank) * self.batch_size
            rows = self.dataset[first : first + self.batch_size]
            for i in range(self.batch_size):
                yield {**{key: values[i] for key, values in rows.items()}, "pass_index": pass_index}


class ResumableLoader(DataLoader):
    """A DataLoader over a ``SequentialTrainingStream``: numbers the passes, applies a resume offset once.

    Each ``iter()`` is one pass (one Lightning epoch); the pass number is counted here, in the main
    process, because worker processes work on copies of the stream.
    """

    def __iter__(self):
        stream = self.dataset
        next_pass = getattr(self, "_next_pass", stream.pass_offset)
        stream.pass_offset = next_pass
        self._next_pass = next_pass + 1
        iterator = super().__iter__()  # workers (if any) have copied the stream by now
        stream.start_batch = 0
        return iterator
