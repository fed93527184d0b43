"""Sequence-length warm-up: short sequences early in the budget, full length from a chosen fraction of it.

Li, Zhang and He (2022, "The Stability-Efficiency Dilemma: Investigating Sequence Length Warmup for Training
GPT Models", arXiv:2108.06084, section 4) truncate every training sequence to a length that grows linearly
from ``start_length`` to the full length over the first ``T`` steps, in multiples of 8:

    length(t) = start + (full - start) * min(t / T, 1),   rounded down to a multiple of ``multiple``.

Here ``t / T`` is budget progress over the warm-up's share of the budget, ``tau / fraction``, so the schedule
ends at the same point of any budget (paper section 2.1). The data module cuts each batch
(``cut_batch``: a masked-LM batch keeps its first tokens; a span-corruption batch keeps the targets of the
sentinels its cut input still holds). Shorter passes cost less: the module charges each at its length and a
cost table prices every length the schedule uses (``train.py calibrate`` measures them); ``train.py plan``
replays the schedule step by step.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from core.contracts import BatchSelector, SequenceSchedule
from core.errors import UserError

__all__ = ["SequenceLengthWarmup", "warmup_length"]


def warmup_length(tau: float, start: int, full: int, fraction: float, multiple: int = 8) -> int:
    """Tokens per sequence at budget progress ``tau`` (Li, Zhang and He 2022, section 4; see the module).

    >>> [warmup_length(t, 32, 128, 0.5, 8) for t in (0.0, 0.1, 0.25, 0.49, 0.5, 1.0)]
    [32, 48, 80, 120, 128, 128]
    """
    if tau >= fraction:
        return full
    length = int(start + (full - start) * tau / fraction) // multiple * multiple
    return max(start, min(full, length))


class SequenceLengthWarmup(Callback, SequenceSchedule):
    """Train on sequences cut to ``warmup_length(tau, ...)`` tokens; the full length from ``fraction`` of the budget.

    Args:
        start_length: tokens per sequence at the start (a multiple of ``multiple``, shorter than the data's
            ``seq_len``).
        fraction: the share of the budget over which the length grows to full (Li et al.: a warm-up of a few
            per cent to a few tens of per cent of training).
        multiple: lengths are rounded down to a multiple of it (Li et al.: 8), which bounds the lengths a cost
            table must price.
    """

    def __init__(self, start_length: int = 32, fraction: float = 0.25, multiple: int = 8) -> None:
        super().__init__()
        if multiple < 1 or start_length < max(2, multiple) or start_length % multiple:
            raise UserError(f"SequenceLengthWarmup start_length={start_length}, multiple={multiple}: start_length must "
                            "be a positive multiple of multiple (and at least 2)")
        if not 0.0 < fraction <= 1.0:
            raise UserError(f"SequenceLengthWarmup fraction={fraction} must be in (0, 1]")
        self.start_length, self.fraction, self.multiple = int(start_length), float(fraction), int(multiple)
        self._length: int | None = None
        self._checked_step = -1

    def planned_length(self, tau: float, full_length: int) -> int:
        return warmup_length(tau, self.start_length, full_length, self.fraction, self.multiple)

    def lengths(self, full_length: int) -> list[int]:
        if self.start_length >= full_length:
            raise UserError(f"SequenceLengthWarmup start_length={self.start_length} must be shorter than the data's "
                            f"seq_len={full_length}")
        return sorted({self.start_length, *range(self.start_length, full_length, self.multiple)})

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        data = trainer.datamodule
        if data is None or not hasattr(data, "cut_batch"):
            raise UserError("SequenceLengthWarmup needs a pre-training data module that cuts its batches "
                            "(MLMDataModule, SpanCorruptionDataModule)")
        if any(isinstance(c, BatchSelector) for c in trainer.callbacks):
            raise UserError("SequenceLengthWarmup cannot be combined with batch selection yet: its candidates are "
                            "scored at full length; keep one of them")
        self.lengths(data.seq_len)  # a start length that is not shorter fails now

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        full = trainer.datamodule.seq_len
        if trainer.global_step != self._checked_step:  # the length stays fixed within an optimizer step
            self._checked_step = trainer.global_step
            self._length = self.planned_length(pl_module.budget_progress(), full)
            pl_module.log("data/seq_len", float(self._length), on_step=True, on_epoch=False)
        if self._length < full:
            batch.update(trainer.datamodule.cut_batch(batch, self._length))  # the very dict training_step gets
