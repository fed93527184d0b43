"""Weight averaging: the weights one evaluates are not the weights one trains.

``EvaluationWeights`` is the seam: a callback that offers ``evaluation_weights()`` (parameters by name, or
``None`` while it has none) gets them swapped in for every validation, written as the ``state_dict`` of every
checkpoint (so ``validate --ckpt_path`` and ``export`` see them), while training goes on with the raw weights:
a checkpoint keeps those under ``raw_state_dict`` and a resume trains on from them, exactly as an
uninterrupted run.

The methods:

- ``EMA``: an exponential moving average of the weights, ``a <- decay * a + (1 - decay) * w`` after every
  ``every``-th optimizer step (Polyak and Juditsky 1992; the form of Kaddour 2022's EMA baseline).
- ``LAWA``: latest weight averaging (Kaddour 2022, arXiv:2209.14981): the uniform average of the last ``k``
  snapshots of the weights, one taken every ``interval`` optimizer steps.

The arithmetic is in pure functions (``ema_update``, ``uniform_average``) that tests pin against hand-computed
averages. Their work is charged to the RST budget as kinds of their own (``DoesOwnWork``): ``ema_update`` and
``lawa_snapshot``, one event each; a cost table prices them under ``work_seconds`` (``train.py calibrate``
times them), and ``train.py plan`` replays them. Averaging the snapshots for a validation is evaluation,
which no budget charges.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from callbacks.rst import charged_work
from core.contracts import DoesOwnWork
from core.errors import UserError

__all__ = ["EMA", "LAWA", "EvaluationWeights", "ema_update", "snapshot", "trainable_parameters", "uniform_average"]

RAW_STATE_KEY = "raw_state_dict"


def ema_update(average: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor], decay: float) -> None:
    """``average <- decay * average + (1 - decay) * weights``, in place, name by name."""
    for name, value in average.items():
        value.mul_(decay).add_(weights[name].detach().to(value.dtype), alpha=1.0 - decay)


def uniform_average(snapshots: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The name-by-name mean of ``snapshots``."""
    if not snapshots:
        raise ValueError("no snapshots to average")
    return {name: torch.stack([s[name] for s in snapshots]).mean(0) for name in snapshots[0]}


def trainable_parameters(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
    """The parameters an average follows, by name: those that train."""
    return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}


def snapshot(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached copy of ``weights``, name by name."""
    return {name: value.detach().clone() for name, value in weights.items()}


def _seconds_per_call(work, repeats: int = 5) -> float:
    """The median wall seconds of ``work()`` over ``repeats`` calls, after one warm-up call."""
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _aliases(pl_module: L.LightningModule) -> dict[str, str]:
    """Every name a parameter has in the ``state_dict`` -> the name ``named_parameters`` gives it (a tied weight,
    such as BERT's decoder and word embeddings, is one parameter under two names)."""
    first: dict[int, str] = {}
    return {name: first.setdefault(id(p), name) for name, p in pl_module.named_parameters(remove_duplicate=False)}


def _with(state: dict[str, Any], values: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> dict[str, Any]:
    """``state`` with every name of each parameter in ``values`` set to its value."""
    out = dict(state)
    for key, name in aliases.items():
        if key in out and name in values:
            out[key] = values[name].detach().clone()
    return out


class EvaluationWeights(Callback):
    """The seam for callbacks whose weights are evaluated in place of the trained ones (see the module)."""

    def __init__(self) -> None:
        super().__init__()
        self._raw: dict[str, torch.Tensor] | None = None

    @abstractmethod
    def evaluation_weights(self) -> dict[str, torch.Tensor] | None:
        """The parameters to evaluate, by ``named_parameters`` name; ``None``: none yet (the raw ones are used)."""

    def _swap_in(self, pl_module: L.LightningModule) -> None:
        weights = self.evaluation_weights()
        if weights is None or self._raw is not None:
            return
        parameters = trainable_parameters(pl_module)
        self._raw = {name: parameters[name].detach().clone() for name in weights}
        with torch.no_grad():
            for name, value in weights.items():
                parameters[name].copy_(value)

    def _swap_out(self, pl_module: L.LightningModule) -> None:
        if self._raw is None:
            return
        parameters = trainable_parameters(pl_module)
        with torch.no_grad():
            for name, value in self._raw.items():
                parameters[name].copy_(value)
        self._raw = None

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(pl_module)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        weights = self.evaluation_weights()
        if weights is None:
            return
        aliases = _aliases(pl_module)
        raw = dict(checkpoint["state_dict"])
        if self._raw is not None:  # saved during a validation: the module holds the averaged weights right now
            raw = _with(raw, self._raw, aliases)
        checkpoint[RAW_STATE_KEY] = raw
        checkpoint["state_dict"] = _with(raw, weights, aliases)

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning loaded the (averaged) state_dict into the module already; training goes on from the raw one
        if RAW_STATE_KEY in checkpoint:
            pl_module.load_state_dict(checkpoint[RAW_STATE_KEY])


class EMA(EvaluationWeights, DoesOwnWork):
    """An exponential moving average of the weights, evaluated, checkpointed and exported in their place.

    Args:
        decay: the weight of the old average at each update (0 < decay < 1).
        every: optimizer steps between updates.
    """

    def __init__(self, decay: float = 0.999, every: int = 1) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise UserError(f"EMA decay={decay} must be in (0, 1), e.g. 0.999")
        if every < 1:
            raise UserError(f"EMA every={every} must be a positive number of optimizer steps")
        self.decay, self.every = float(decay), int(every)
        self.average: dict[str, torch.Tensor] | None = None
        self._last_step = -1

    def evaluation_weights(self) -> dict[str, torch.Tensor] | None:
        return self.average

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step == self._last_step or step % self.every:
            return  # before the first update, inside gradient accumulation, or between updates
        self._last_step = step
        weights = trainable_parameters(pl_module)
        with charged_work(trainer, "ema_update"):
            if self.average is None:
                self.average = snapshot(weights)
            else:
                ema_update(self.average, weights, self.decay)

    def work_kinds(self) -> dict[str, str]:
        return {"ema_update": "events"}

    def planned_work(self, step: int, tau: float) -> dict[str, float]:
        return {"ema_update": 1.0} if step % self.every == 0 else {}

    def measure_work(self, model: L.LightningModule) -> dict[str, float]:
        weights = trainable_parameters(model)
        average = snapshot(weights)
        return {"ema_update": _seconds_per_call(lambda: ema_update(average, weights, self.decay))}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average, "last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.average, self._last_step = state_dict["average"], int(state_dict["last_step"])


class LAWA(EvaluationWeights, DoesOwnWork):
    """Latest weight averaging (Kaddour 2022): the mean of the last ``k`` snapshots, one every ``interval``
    optimizer steps, evaluated, checkpointed and exported in place of the trained weights.

    Args:
        k: snapshots averaged (Kaddour 2022: 5 to 10).
        interval: optimizer steps between snapshots.
    """

    def __init__(self, k: int = 5, interval: int = 100) -> None:
        super().__init__()
        if k < 1 or interval < 1:
            raise UserError(f"LAWA k={k}, interval={interval}: both must be positive")
        self.k, self.interval = int(k), int(interval)
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self._last_step = -1

    def evaluation_weights(self) -> dict[str, torch.Tensor] | None:
        return uniform_average(self.snapshots) if self.snapshots else None

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step == self._last_step or step % self.interval:
            return
        self._last_step = step
        with charged_work(trainer, "lawa_snapshot"):
            self.snapshots.append(snapshot(trainable_parameters(pl_module)))
            del self.snapshots[: -self.k]

    def work_kinds(self) -> dict[str, str]:
        return {"lawa_snapshot": "events"}

    def planned_work(self, step: int, tau: float) -> dict[str, float]:
        return {"lawa_snapshot": 1.0} if step % self.interval == 0 else {}

    def measure_work(self, model: L.LightningModule) -> dict[str, float]:
        weights = trainable_parameters(model)
        return {"lawa_snapshot": _seconds_per_call(lambda: snapshot(weights))}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"snapshots": self.snapshots, "last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.snapshots, self._last_step = list(state_dict["snapshots"]), int(state_dict["last_step"])
