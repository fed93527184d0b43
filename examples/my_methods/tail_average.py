"""An example weight-averaging callback written against the toolkit's public seams: average the tail of training.

Polyak-Ruppert tail averaging: from budget progress ``start`` on, keep the running mean of the weights after
every optimizer step, ``a <- a + (w - a) / n``, and evaluate, checkpoint and export that mean. The seam
``callbacks.weight_averaging.EvaluationWeights`` swaps the mean in for validation and writes it into every
checkpoint while training goes on with the raw weights; ``core.contracts.DoesOwnWork`` and
``callbacks.rst.charged_work`` charge each update to the RST budget as work of its own kind
(``tail_average``), which ``train.py plan`` replays and ``train.py calibrate --update --work`` prices. It is
a worked example of the extension surface, not a method the toolkit recommends.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from callbacks.rst import charged_work
from callbacks.weight_averaging import EvaluationWeights, snapshot, trainable_parameters
from core.contracts import DoesOwnWork


def running_mean(mean: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], count: int) -> None:
    """``mean <- mean + (weights - mean) / count``, in place: the mean of ``count`` weights given that of the
    first ``count - 1``."""
    for name, value in mean.items():
        value.add_(weights[name].detach().to(value.dtype) - value, alpha=1.0 / count)


class TailAverage(EvaluationWeights, DoesOwnWork):
    """The mean of the weights after every optimizer step from budget progress ``start`` on.

    Args:
        start: the budget progress (tau) from which steps are averaged.
    """

    def __init__(self, start: float = 0.5) -> None:
        super().__init__()
        self.start = float(start)
        self.mean: dict[str, torch.Tensor] | None = None
        self.count = 0
        self._last_step = -1

    def evaluation_weights(self) -> dict[str, torch.Tensor] | None:
        return self.mean

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step or pl_module.budget_progress() < self.start:
            return  # inside gradient accumulation, or before the tail
        self._last_step = step
        weights = trainable_parameters(pl_module)
        with charged_work(trainer, "tail_average"):
            self.count += 1
            if self.mean is None:
                self.mean = snapshot(weights)
            else:
                running_mean(self.mean, weights, self.count)

    # ----- what the RST clock needs (core.contracts.DoesOwnWork) -----------------------------------------
    def work_kinds(self) -> dict[str, str]:
        return {"tail_average": "events"}

    def planned_work(self, step: int, tau: float) -> dict[str, float]:
        return {"tail_average": 1.0} if tau >= self.start else {}

    def measure_work(self, model: L.LightningModule) -> dict[str, float]:
        import time

        weights = trainable_parameters(model)
        mean = snapshot(weights)
        running_mean(mean, weights, 2)  # warm-up
        start = time.perf_counter()
        for count in range(3, 8):
            running_mean(mean, weights, count)
        return {"tail_average": (time.perf_counter() - start) / 5}

    # ----- checkpoint ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "count": self.count, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.mean, self.count, self._last_step = state_dict["mean"], int(state_dict["count"]), int(state_dict["last_step"])
