"""The result of a fit, for people (one printed line) and for programs (``summary.json`` beside the logs).

``compare``, the tests and the benchmark read ``summary.json`` (``read_summary``); nothing parses printed lines.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from core.contracts import BudgetClock

__all__ = ["SUMMARY_FILE", "RunSummary", "read_summary", "summarize_fit", "write_summary"]

SUMMARY_FILE = "summary.json"
FORMAT = "run-summary/1"


@dataclass(frozen=True)
class RunSummary:
    """What a fit did.

    Attributes:
        status: ``finished`` (the budget or ``max_steps`` ended it), ``preempted`` (SIGTERM: saved, to be resumed) or
            ``diverged`` (stopped on non-finite numbers: ``error`` says where).
        optimizer_steps: optimizer steps of the whole run (resumed parts included).
        tokens: tokens trained on (forward+backward examples x tokens per sequence, a sequence cut shorter by
            sequence-length warm-up in proportion), the whole run.
        rst_seconds: Reference System Time spent (the run's ``BudgetClock``), ``None`` without one.
        train_loss: the training loss of the last optimizer step.
        val_loss: the final validation loss (``None`` when pre-empted or without validation data).
        unigram_entropy: the unigram entropy of the validation targets (what predicting token frequencies
            alone would score), ``None`` where the data module does not know it.
        log_dir: the logger's version directory.
        checkpoint: the last checkpoint written (``""``: none).
        error: why a ``diverged`` run stopped.
    """

    status: Literal["finished", "preempted", "diverged"]
    optimizer_steps: int
    tokens: int
    rst_seconds: float | None
    train_loss: float | None
    val_loss: float | None
    unigram_entropy: float | None
    log_dir: str
    checkpoint: str
    error: str = ""

    def line(self) -> str:
        """The one line a person reads at the end of a finished fit."""
        loss = f"{self.val_loss:.4f}" if self.val_loss is not None else "n/a"
        if self.unigram_entropy is not None:
            loss += f" (unigram entropy of this corpus {self.unigram_entropy:.4f})"
        log_dir = self.log_dir or "(no logger)"
        return (
            f"done: {self.optimizer_steps} steps, {self.tokens:,} tokens, final val/loss {loss}; "
            f"TensorBoard logs: {log_dir} (tensorboard --logdir {os.path.dirname(log_dir) or log_dir}); "
            f"checkpoint: {self.checkpoint or 'none saved'}"
        )


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def summarize_fit(trainer, model, datamodule, train_loss: float | None, val_loss: float | None,
                  status: str = "finished", error: str = "") -> RunSummary:
    """The summary of the fit ``trainer`` just ran (call it on every rank: ``trainer.log_dir`` is a collective).

    ``train_loss`` is read from ``trainer.callback_metrics`` before the final validation, which resets them.
    """
    work = model.work_done(trainer.world_size)
    clock = next((c for c in trainer.callbacks if isinstance(c, BudgetClock)), None)
    checkpoint = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
    return RunSummary(
        status=status,
        optimizer_steps=int(trainer.global_step),
        tokens=int(work.tokens_trained(datamodule.tokens_per_sequence, datamodule.seq_len)),
        rst_seconds=_float(clock.spent_seconds) if clock is not None else None,
        train_loss=_float(train_loss),
        val_loss=_float(val_loss),
        unigram_entropy=_float(datamodule.target_unigram_entropy),
        log_dir=trainer.log_dir or "",
        checkpoint=checkpoint or "",
        error=error,
    )


def write_summary(summary: RunSummary) -> Path | None:
    """Write ``summary.json`` into the run's log directory (atomically); ``None`` without a logger."""
    if not summary.log_dir:
        return None
    path = Path(summary.log_dir) / SUMMARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps({"format": FORMAT, **asdict(summary)}, indent=2) + "\n")
    os.replace(temporary, path)
    return path


def read_summary(log_dir: str | Path) -> RunSummary | None:
    """The summary a fit wrote into ``log_dir``; ``None`` if it wrote none (it failed or is still running)."""
    path = Path(log_dir) / SUMMARY_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.pop("format", None) != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    return RunSummary(**data)
