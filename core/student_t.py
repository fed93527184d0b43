"""Student's t distribution, central and noncentral, in plain Python (no SciPy at run time).

What ``core.significance`` needs: the two-sided tail ``P(|T| >= t)`` (p-values), the quantile (confidence
intervals, critical values) and the noncentral t distribution function (the power of a t-test).

* Central t: ``P(|T| >= t) = I_{df/(df+t^2)}(df/2, 1/2)`` (Abramowitz & Stegun 1964, eq. 26.7.1 with 26.5.27),
  the regularised incomplete beta function evaluated by its continued fraction (A&S eq. 26.5.8) with the
  modified Lentz method (Press et al., *Numerical Recipes*, 3rd ed., section 6.4). ``df`` may be fractional
  (Welch-Satterthwaite degrees of freedom).
* Noncentral t with ``df`` degrees of freedom and noncentrality ``delta``, ``T' = (Z + delta) / sqrt(V / df)``:
  the Poisson mixture of incomplete beta functions of Lenth (1989, Applied Statistics 38, algorithm AS 243),
  ``F(t) = Phi(-delta) + 1/2 sum_j [P_j I_x(j + 1/2, df/2) + delta/sqrt(2) Q_j I_x(j + 1, df/2)]`` with
  ``x = t^2/(df + t^2)``, ``P_j = e^{-lam} lam^j / j!``, ``Q_j = e^{-lam} lam^j / Gamma(j + 3/2)``, ``lam = delta^2/2``,
  summed from the largest Poisson weight outwards in both directions as Benton & Krishnamoorthy (2003,
  Computational Statistics & Data Analysis 43, section 5) do, so that a large ``delta`` (where AS 243's first
  weight ``e^{-lam}`` underflows) still works. The incomplete beta functions of neighbouring terms follow from
  one another by ``I_x(a + 1, b) = I_x(a, b) - x^a (1 - x)^b / (a B(a, b))`` (A&S eq. 26.5.16).

Checked against ``scipy.stats.t`` and ``scipy.stats.nct`` in tests/test_significance.py.
"""

from __future__ import annotations

import math

__all__ = ["noncentral_t_cdf", "normal_cdf", "student_t_two_sided_p", "student_t_quantile"]

_EPSILON = 1e-16  # the stopping tolerance of the series: below what a float resolves next to 1
_TINY = 1e-250  # a recurrence step this small is recomputed from its formula (it may have underflowed)


def normal_cdf(z: float) -> float:
    """Phi(z), the standard normal distribution function."""
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


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
    """The t with P(T <= t) = probability (bisection on the distribution function); for confidence intervals.

    ``probability`` in (0, 1); below 1/2 by symmetry, ``t_p = -t_{1-p}``.
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability}")
    if probability < 0.5:
        return -student_t_quantile(1.0 - probability, df)
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
        if high - low <= 1e-15 * high:
            break
    return (low + high) / 2.0


def noncentral_t_cdf(t: float, df: float, delta: float) -> float:
    """P(T' <= t) for the noncentral t with ``df`` (> 0, may be fractional) degrees of freedom and noncentrality
    ``delta``; ``delta = 0`` is Student's t. Absolute error about 1e-13 (see the module docstring for the method)."""
    if not df > 0.0:
        raise ValueError(f"df must be positive, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    if t < 0.0:
        return 1.0 - _noncentral_t_cdf_nonnegative(-t, df, -delta)
    return _noncentral_t_cdf_nonnegative(t, df, delta)


def _noncentral_t_cdf_nonnegative(t: float, df: float, delta: float) -> float:
    """The series of the module docstring, for ``t >= 0``."""
    x = t * t / (df + t * t)
    base = normal_cdf(-delta)
    if x <= 0.0:
        return base
    b, lam, scale = df / 2.0, delta * delta / 2.0, delta / math.sqrt(2.0)
    log_x, log_1mx = math.log(x), math.log1p(-x)
    k = int(lam)  # the largest Poisson weight

    def weights(j: int) -> tuple[float, float]:
        if lam == 0.0:
            return (1.0 if j == 0 else 0.0), (1.0 / math.gamma(1.5) if j == 0 else 0.0)
        log_power = -lam + j * math.log(lam)
        return math.exp(log_power - math.lgamma(j + 1.0)), math.exp(log_power - math.lgamma(j + 1.5))

    def step(a: float) -> float:
        """x^a (1 - x)^b / (a B(a, b)): the gap between I_x(a, b) and I_x(a + 1, b)."""
        return math.exp(math.lgamma(a + b) - math.lgamma(a + 1.0) - math.lgamma(b) + a * log_x + b * log_1mx)

    p_k, q_k = weights(k)
    ip_k, iq_k = _betainc(k + 0.5, b, x), _betainc(k + 1.0, b, x)
    total = p_k * ip_k + scale * q_k * iq_k

    # forward, j = k + 1, k + 2, ...: the weights fall by lam / (j + 1) or faster, so the rest of the series is
    # below (P_j + |scale| Q_j) r / (1 - r) with r = lam / (j + 1) once r < 1 (every I_x is at most 1)
    p, q, ip, iq, gp, gq = p_k, q_k, ip_k, iq_k, step(k + 0.5), step(k + 1.0)
    j = k
    while True:
        ip, iq = max(ip - gp, 0.0), max(iq - gq, 0.0)
        j += 1
        gp = gp * x * (j - 0.5 + b) / (j + 0.5) if gp > _TINY else step(j + 0.5)
        gq = gq * x * (j + b) / (j + 1.0) if gq > _TINY else step(j + 1.0)
        p *= lam / j
        q *= lam / (j + 0.5)
        total += p * ip + scale * q * iq
        r = lam / (j + 1.0)
        if r < 1.0 and (p + abs(scale) * q) * r / (1.0 - r) < _EPSILON or j > k + 100_000:
            break

    # backward, j = k - 1, ..., 0: going down the weights fall by j / lam (P) and (j + 1/2) / lam (Q)
    p, q, ip, iq = p_k, q_k, ip_k, iq_k
    gp, gq = step(k + 0.5), step(k + 1.0)  # I_x(a - 1, b) = I_x(a, b) + step(a - 1)
    j = k
    while j > 0:
        gp = gp * (j + 0.5) / (x * (j - 0.5 + b)) if gp > _TINY else step(j - 0.5)
        gq = gq * (j + 1.0) / (x * (j + b)) if gq > _TINY else step(j)
        ip, iq = ip + gp, iq + gq
        p *= j / lam
        q *= (j + 0.5) / lam
        j -= 1
        total += p * ip + scale * q * iq
        r = (j + 0.5) / lam
        if r < 1.0 and (p + abs(scale) * q) * r / (1.0 - r) < _EPSILON:
            break
    return min(max(base + 0.5 * total, 0.0), 1.0)
