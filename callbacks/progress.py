"""``StepProgressBar``, ``RichStepProgressBar``: Lightning's progress bar, fed with host numbers so that a step never waits for the device.

Lightning's progress bar shows the metrics logged with ``prog_bar=True``, and to show them it reads each
one from the device after every training batch: one host synchronisation per metric per step, which on a
GPU stops the host from queueing the next step while the device works (docs/performance.md, "A step that
never waits"). Training metrics are therefore logged without ``prog_bar``; these bars add what the module
and the callbacks hand it as plain numbers (``progress_bar_values()``: the loss of the last logging step,
the RST spent and left), which cost nothing to read. ``train.py`` puts one in place of Lightning's default bar (``with_host_values``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from typing_extensions import override

__all__ = ["RichStepProgressBar", "StepProgressBar", "host_values", "with_host_values"]


def host_values(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, str]:
    """The ``progress_bar_values()`` of the module and of every callback that has one, formatted."""
    shown: dict[str, str] = {}
    for source in (pl_module, *trainer.callbacks):
        values = getattr(source, "progress_bar_values", None)
        if callable(values):
            shown.update({name: f"{value:.4g}" for name, value in values().items()})
    return shown


class StepProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` plus ``host_values``."""

    @override
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return {**super().get_metrics(trainer, pl_module), **host_values(trainer, pl_module)}


class RichStepProgressBar(RichProgressBar):
    """``RichProgressBar`` (Lightning's default where ``rich`` is installed) plus ``host_values``."""

    @override
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return {**super().get_metrics(trainer, pl_module), **host_values(trainer, pl_module)}


def with_host_values(trainer: L.Trainer) -> None:
    """Put the matching bar above in place of Lightning's own TQDM or Rich bar, with its settings (a subclass of
    either, or another bar, that the user configured stays)."""
    bar = trainer.progress_bar_callback
    if type(bar) is TQDMProgressBar:
        replacement: ProgressBar = StepProgressBar(bar.refresh_rate, bar.process_position, bar._leave)
    elif type(bar) is RichProgressBar:
        replacement = RichStepProgressBar(bar.refresh_rate, bar._leave, bar.theme, bar._console_kwargs)
    else:
        return
    trainer.callbacks[trainer.callbacks.index(bar)] = replacement
