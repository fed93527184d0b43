"""Welch's two-sample t-test and confidence interval, in plain Python (no SciPy).

``train.py compare`` asks whether a method's mean over seeds differs from the baseline's. Seeds of two
methods are independent samples whose variances need not be equal (a method can make training less
stable), so the test is Welch's (Welch 1947): ``t = (mean_a - mean_b) / sqrt(s_a^2/n_a + s_b^2/n_b)``
with the Welch-Satterthwaite degrees of freedom, two-sided. The Student-t distribution function
comes from the regularised incomplete beta function, ``P(|T| > t) = I_{df/(df+t^2)}(df/2, 1/2)``,
evaluated by its continued fraction (Lentz's method).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

__all__ = ["WelchResult", "student_t_two_sided_p", "student_t_quantile", "welch_t_test"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom (``df`` may be fractional)."""
    if math.isinf(df):
        return math.erfc(abs(t) / math.sqrt(2.0))
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def student_t_quantile(probability: float, df: float) -> float:
    """The t with P(T <= t) = probability (bisection on the distribution function); for confidence intervals."""
    if not 0.5 <= probability < 1.0:
        raise ValueError("probability must be in [0.5, 1)")
    target = 2.0 * (1.0 - probability)  # two-sided tail mass at the quantile
    low, high = 0.0, 1.0
    while student_t_two_sided_p(high, df) > target:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if student_t_two_sided_p(middle, df) > target:
            low = middle
        else:
            high = middle
    return (low + high) / 2.0


@dataclass(frozen=True)
class WelchResult:
    """``difference`` = mean(a) - mean(b), its ``confidence``-level interval, the two-sided p-value."""

    difference: float
    low: float
    high: float
    p_value: float
    t: float
    df: float
    confidence: float


def welch_t_test(a: list[float], b: list[float], confidence: float = 0.95) -> WelchResult | None:
    """Welch's t-test of mean(a) = mean(b); ``None`` with fewer than two values on a side (no variance)."""
    if len(a) < 2 or len(b) < 2:
        return None
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    var_a, var_b = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    difference, se2 = mean_a - mean_b, var_a + var_b
    if se2 == 0.0:
        p = 1.0 if difference == 0.0 else 0.0
        return WelchResult(difference, difference, difference, p, math.copysign(math.inf, difference) if difference else 0.0,
                           math.inf, confidence)
    df = se2 * se2 / (var_a * var_a / (len(a) - 1) + var_b * var_b / (len(b) - 1))
    t = difference / math.sqrt(se2)
    half = student_t_quantile(0.5 + confidence / 2.0, df) * math.sqrt(se2)
    return WelchResult(difference, difference - half, difference + half, student_t_two_sided_p(t, df), t, df, confidence)
