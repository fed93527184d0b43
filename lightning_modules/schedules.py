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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["SCHEDULES", "LRSchedule", "ScheduleName", "constant", "cosine", "linear", "triangle"]

ScheduleName = Literal["triangle", "cosine", "linear", "constant"]


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


SCHEDULES = {"triangle": triangle, "cosine": cosine, "linear": linear, "constant": constant}


@dataclass(frozen=True)
class LRSchedule:
    """A named schedule with its settings; calling it with ``tau`` gives the LR multiplier.

    Args:
        name: ``triangle``, ``cosine``, ``linear`` or ``constant``.
        warmup_fraction: budget fraction of the warm-up (cosine, linear, constant).
        final: multiplier at the end of the budget (cosine floor, linear end point).
        warmup_start: multiplier at ``tau=0`` (cosine only; nanoT5 starts at 0.5).
        peak_fraction: where the triangle peaks.
    """

    name: ScheduleName = "triangle"
    warmup_fraction: float = 0.0
    final: float = 0.0
    warmup_start: float = 0.0
    peak_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.name!r}: use one of {', '.join(SCHEDULES)}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        if not 0.0 < self.peak_fraction < 1.0:
            raise ValueError(f"peak_fraction={self.peak_fraction} must be in (0, 1)")
        if not 0.0 <= self.final <= 1.0:
            raise ValueError(f"final={self.final} must be in [0, 1]")

    def __call__(self, tau: float) -> float:
        if self.name == "triangle":
            return triangle(tau, self.peak_fraction)
        if self.name == "cosine":
            return cosine(tau, self.warmup_fraction, self.final, self.warmup_start)
        if self.name == "linear":
            return linear(tau, self.warmup_fraction, self.final)
        return constant(tau, self.warmup_fraction)
