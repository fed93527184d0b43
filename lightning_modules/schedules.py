"""Learning-rate schedules as pure functions of budget progress ``tau`` in [0, 1].

``tau`` is RST spent / RST budget (or optimizer step / ``max_steps`` with a step budget), so the
schedule reaches its final value exactly when the budget ends: the paper's "fully-decayed learning
rate" baseline (paper section 2.1; docs/paper.md "Schedules tied to RST"). Each function returns a multiplier of the peak learning rate.

- ``triangle``: the paper's BERT one-cycle, ``2 tau`` up to the peak at ``tau = 0.5``, then ``2 - 2 tau``
  down to exactly 0 at ``tau = 1`` (the paper's BERT).
- ``cosine``: linear warm-up from ``warmup_start`` to 1 over ``warmup_fraction``, then half a cosine to
  ``final`` at ``tau = 1``, never below ``final``. The paper's T5 (nanoT5 cosine-budget) is
  ``warmup_start=0.5, warmup_fraction=10000/65536, final=1e-5``.
- ``linear``: linear warm-up from 0, then linear decay to ``final`` at ``tau = 1``.
- ``constant``: linear warm-up from 0, then 1.
- ``wsd``: warm-up, stable, decay (Hu et al. 2024, MiniCPM; Hägele et al. 2024): linear warm-up from 0
  over ``warmup_fraction``, the peak until ``1 - decay_fraction``, then a ``linear``, ``cosine`` or
  ``sqrt`` (``1 - sqrt(progress)``, Hägele et al.'s best) decay to ``final`` at ``tau = 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["SCHEDULES", "LRSchedule", "ScheduleName", "constant", "cosine", "linear", "triangle", "wsd"]

ScheduleName = Literal["triangle", "cosine", "linear", "constant", "wsd"]
DecayShape = Literal["linear", "cosine", "sqrt"]


def _clip(tau: float) -> float:
    return min(max(float(tau), 0.0), 1.0)


def triangle(tau: float, peak_fraction: float = 0.5) -> float:
    """One-cycle triangle: 0 at ``tau=0``, 1 at ``tau=peak_fraction``, 0 at ``tau=1``."""
    tau = _clip(tau)
    if tau < peak_fraction:
        return tau / peak_fraction
    return (1.0 - tau) / (1.0 - peak_fraction)


def cosine(tau: float, warmup_fraction: float = 0.0, final: float = 0.0, warmup_start: float = 0.0) -> float:
    """Warm-up then cosine decay to ``final`` at ``tau=1`` (floored at ``final``)."""
    tau = _clip(tau)
    if tau < warmup_fraction:
        return warmup_start + (1.0 - warmup_start) * tau / warmup_fraction
    span = 1.0 - warmup_fraction
    progress = (tau - warmup_fraction) / span if span > 0 else 1.0
    return max(final, 0.5 * (1.0 + math.cos(math.pi * progress)))


def linear(tau: float, warmup_fraction: float = 0.0, final: float = 0.0) -> float:
    """Linear warm-up from 0, then linear decay to ``final`` at ``tau=1``."""
    tau = _clip(tau)
    if tau < warmup_fraction:
        return tau / warmup_fraction
    span = 1.0 - warmup_fraction
    progress = (tau - warmup_fraction) / span if span > 0 else 1.0
    return 1.0 - (1.0 - final) * progress


def constant(tau: float, warmup_fraction: float = 0.0) -> float:
    """Linear warm-up from 0, then 1."""
    tau = _clip(tau)
    return tau / warmup_fraction if tau < warmup_fraction else 1.0


def wsd(tau: float, warmup_fraction: float = 0.0, decay_fraction: float = 0.2, final: float = 0.0,
        decay_shape: str = "linear") -> float:
    """Warm-up, stable at 1, then decay over the last ``decay_fraction`` to ``final`` at ``tau=1``."""
    tau = _clip(tau)
    if tau < warmup_fraction:
        return tau / warmup_fraction
    decay_start = 1.0 - decay_fraction
    if tau < decay_start or decay_fraction <= 0:
        return 1.0
    if tau >= 1.0:
        return final  # exactly, whatever the rounding of decay_start
    progress = (tau - decay_start) / decay_fraction
    if decay_shape == "linear":
        remaining = 1.0 - progress
    elif decay_shape == "cosine":
        remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif decay_shape == "sqrt":
        remaining = 1.0 - math.sqrt(progress)
    else:
        raise ValueError(f"unknown decay_shape {decay_shape!r}: use linear, cosine or sqrt")
    return final + (1.0 - final) * remaining


SCHEDULES = {"triangle": triangle, "cosine": cosine, "linear": linear, "constant": constant, "wsd": wsd}


@dataclass(frozen=True)
class LRSchedule:
    """A named schedule with its settings; calling it with ``tau`` gives the LR multiplier.

    Args:
        name: ``triangle``, ``cosine``, ``linear`` or ``constant``.
        warmup_fraction: budget fraction of the warm-up (cosine, linear, constant).
        final: multiplier at the end of the budget (cosine floor, linear end point).
        warmup_start: multiplier at ``tau=0`` (cosine only; nanoT5 starts at 0.5).
        peak_fraction: where the triangle peaks.
        decay_fraction: budget fraction of the final decay (wsd).
        decay_shape: ``linear``, ``cosine`` or ``sqrt`` (wsd).
    """

    name: ScheduleName = "triangle"
    warmup_fraction: float = 0.0
    final: float = 0.0
    warmup_start: float = 0.0
    peak_fraction: float = 0.5
    decay_fraction: float = 0.2
    decay_shape: DecayShape = "linear"

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.name!r}: use one of {', '.join(SCHEDULES)}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        if not 0.0 < self.peak_fraction < 1.0:
            raise ValueError(f"peak_fraction={self.peak_fraction} must be in (0, 1)")
        if not 0.0 <= self.final <= 1.0:
            raise ValueError(f"final={self.final} must be in [0, 1]")
        if not 0.0 < self.decay_fraction <= 1.0 or self.warmup_fraction + self.decay_fraction > 1.0:
            raise ValueError(
                f"decay_fraction={self.decay_fraction} must be in (0, 1] and leave room for the warm-up "
                f"({self.warmup_fraction})"
            )
        if self.decay_shape not in ("linear", "cosine", "sqrt"):
            raise ValueError(f"unknown decay_shape {self.decay_shape!r}: use linear, cosine or sqrt")

    def __call__(self, tau: float) -> float:
        if self.name == "triangle":
            return triangle(tau, self.peak_fraction)
        if self.name == "cosine":
            return cosine(tau, self.warmup_fraction, self.final, self.warmup_start)
        if self.name == "linear":
            return linear(tau, self.warmup_fraction, self.final)
        if self.name == "wsd":
            return wsd(tau, self.warmup_fraction, self.decay_fraction, self.final, self.decay_shape)
        return constant(tau, self.warmup_fraction)
