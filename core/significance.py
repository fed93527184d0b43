"""Did a method beat the baseline? The t-tests and the power statement of ``train.py compare``, in plain Python.

A reader's guide (the distributions themselves are in ``core.student_t``):

**Which test.** Every quantity compared (validation loss, ...) is one number per seed and arm (method or baseline).

* ``paired_t_test`` when every seed ran in both arms. A method and the baseline run with the same seed share
  the data order and the masks, so much of the seed-to-seed noise is common to both; the test looks at the
  per-seed differences ``d_i = a_i - b_i`` only (Student 1908): ``t = mean(d) / (sd(d) / sqrt(n))`` on ``n - 1``
  degrees of freedom, two-sided, and the interval ``mean(d) +- t_{(1+confidence)/2, n-1} sd(d) / sqrt(n)``.
  The caller lines the two lists up by seed and leaves out seeds missing from either arm.
* ``welch_t_test`` otherwise (seeds missing from one arm, or arms that share nothing). The arms are then two
  independent samples whose variances need not be equal (a method can make training less stable), so the
  test is Welch's (Welch 1947): ``t = (mean_a - mean_b) / sqrt(s_a^2/n_a + s_b^2/n_b)`` with the
  Welch-Satterthwaite degrees of freedom, two-sided.

Both return a ``TTestResult``: ``difference`` (method minus baseline), the ``confidence``-level interval
``low``..``high``, ``p_value``, ``t``, ``df``, and ``None`` with fewer than two seeds on a side (paired: fewer than
two pairs), where there is no variance to estimate at all.

**Not testable.** When every seed gives the same value on both sides (Welch), or every pair differs by the same
amount (paired), the seed-to-seed noise is estimated as zero, and a t-test would divide by it: ``p = 0`` for
different constants, ``p = 1`` for equal ones. Neither means anything (two or three identical values say
nothing about how much the next seed would move), so the result says ``testable=False`` with a ``reason``, the
observed ``difference``, and ``None`` for ``p_value``, ``low``, ``high``, ``t``, ``df``. A spread below
``1e-12`` of the values' magnitude counts as zero (floating-point rounding of differences of equal decimals,
``3.1 - 3.0`` against ``3.3 - 3.2``, is not noise); so does a value that is not finite (a diverged run).

**What a non-significant result can say.** ``minimum_detectable_difference`` is the smallest true difference
in means that the same two-sided test at level ``alpha`` finds (``p < alpha``) with probability ``power``
(80 % unless told), given the observed seed-to-seed standard deviation(s) and the numbers of seeds; every
testable result carries it as ``detectable_difference`` (``alpha = 1 - confidence``, power 80 %). So "did not
beat the baseline" reads as "could not tell a difference smaller than ``detectable_difference``": a real gain
below it goes unnoticed more than one time in five with this many seeds, and more seeds (or pairing) shrink it.
It is computed from the exact power of the t-test (the noncentral t distribution, see that function), which
for Welch's test with unequal variances is the usual approximation of Welch's statistic by a noncentral t on
the Welch-Satterthwaite degrees of freedom.

Everything here is checked against SciPy (``scipy.stats.ttest_ind``, ``ttest_rel``, ``t``, ``nct``) in
tests/test_significance.py; SciPy is a test dependency only.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from core.student_t import noncentral_t_cdf, student_t_quantile, student_t_two_sided_p

__all__ = ["TTestResult", "WelchResult", "minimum_detectable_difference", "paired_t_test", "student_t_quantile",
           "student_t_two_sided_p", "t_test_power", "welch_t_test"]

ZERO_SPREAD = 1e-12  # a standard deviation at most this fraction of the values' magnitude counts as zero
DEFAULT_POWER = 0.8


@dataclass(frozen=True)
class TTestResult:
    """``difference`` = mean(a) - mean(b) (paired: the mean per-seed difference), its ``confidence``-level
    interval ``low``..``high`` and the two-sided ``p_value``.

    ``testable=False`` (with a ``reason``) when the noise cannot be estimated: then ``low``, ``high``,
    ``p_value``, ``t``, ``df`` and ``detectable_difference`` are ``None``. ``test`` is ``"welch"`` or
    ``"paired"``; ``n_a``, ``n_b`` the seeds per side (paired: both the number of pairs).
    ``detectable_difference``: ``minimum_detectable_difference`` at ``alpha = 1 - confidence``, power 80 %.
    """

    difference: float
    low: float | None
    high: float | None
    p_value: float | None
    t: float | None
    df: float | None
    confidence: float
    test: str = "welch"
    n_a: int = 0
    n_b: int = 0
    testable: bool = True
    reason: str | None = None
    detectable_difference: float | None = None


WelchResult = TTestResult  # the name ``train.py compare`` knew first


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _not_testable(difference: float, confidence: float, test: str, n_a: int, n_b: int, reason: str) -> TTestResult:
    return TTestResult(difference, None, None, None, None, None, confidence, test, n_a, n_b, False, reason)


def _magnitude(*samples: Sequence[float]) -> float:
    return max(abs(v) for sample in samples for v in sample)


def welch_t_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> TTestResult | None:
    """Welch's t-test of mean(a) = mean(b); ``None`` with fewer than two values on a side (no variance);
    not testable (``p_value=None``) when neither side varies.

    >>> welch_t_test([1, 2, 3, 4, 5], [3, 4, 5, 6, 7]).p_value  # t = -2 on 8 df  # doctest: +ELLIPSIS
    0.0805...
    """
    _check_confidence(confidence)
    if len(a) < 2 or len(b) < 2:
        return None
    n_a, n_b = len(a), len(b)
    if not all(math.isfinite(v) for v in (*a, *b)):
        return _not_testable(statistics.fmean(a) - statistics.fmean(b), confidence, "welch", n_a, n_b,
                             "a value is not finite (a diverged run?)")
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    var_a, var_b = statistics.variance(a) / n_a, statistics.variance(b) / n_b
    difference, se2 = mean_a - mean_b, var_a + var_b
    if math.sqrt(se2) <= ZERO_SPREAD * _magnitude(a, b):
        return _not_testable(difference, confidence, "welch", n_a, n_b,
                             "no seed-to-seed variation on either side: the noise cannot be estimated")
    df = se2 * se2 / (var_a * var_a / (n_a - 1) + var_b * var_b / (n_b - 1))
    t = difference / math.sqrt(se2)
    half = student_t_quantile(0.5 + confidence / 2.0, df) * math.sqrt(se2)
    detectable = minimum_detectable_difference((statistics.stdev(a), statistics.stdev(b)), n_a, n_b,
                                               alpha=1.0 - confidence)
    return TTestResult(difference, difference - half, difference + half, student_t_two_sided_p(t, df), t, df,
                       confidence, "welch", n_a, n_b, True, None, detectable)


def paired_t_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> TTestResult | None:
    """The paired t-test of mean(a_i - b_i) = 0, ``a[i]`` and ``b[i]`` from the same seed; ``None`` with fewer
    than two pairs, not testable (``p_value=None``) when every pair differs by the same amount.

    Differences [1, 2, 3]: mean 2, sd 1, t = 2 sqrt(3) = 3.464 on 2 df, p = 0.0742, 95 % interval
    2 +- 4.3027 / sqrt(3) = -0.484..4.484.

    >>> round(paired_t_test([2, 4, 6], [1, 2, 3]).p_value, 4)
    0.0742
    """
    _check_confidence(confidence)
    if len(a) != len(b):
        raise ValueError(f"a paired test needs one value per seed on both sides, got {len(a)} and {len(b)}")
    n = len(a)
    if n < 2:
        return None
    differences = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(differences)
    if not all(math.isfinite(v) for v in (*a, *b)):
        return _not_testable(mean, confidence, "paired", n, n, "a value is not finite (a diverged run?)")
    sd = statistics.stdev(differences)
    if sd <= ZERO_SPREAD * _magnitude(a, b):
        return _not_testable(mean, confidence, "paired", n, n,
                             "every pair of seeds differs by the same amount: the noise cannot be estimated")
    se, df = sd / math.sqrt(n), n - 1
    t = mean / se
    half = student_t_quantile(0.5 + confidence / 2.0, df) * se
    detectable = minimum_detectable_difference(sd, n, paired=True, alpha=1.0 - confidence)
    return TTestResult(mean, mean - half, mean + half, student_t_two_sided_p(t, df), t, float(df), confidence,
                       "paired", n, n, True, None, detectable)


def _standard_error(sd: float | tuple[float, float] | None, n_a: int, n_b: int | None,
                    paired: bool) -> tuple[float, float] | None:
    """(standard error of the difference in means per unit of it, degrees of freedom), or None if undefined."""
    if sd is None:
        return None
    if paired:
        if isinstance(sd, tuple):
            raise ValueError("a paired test has one standard deviation: that of the per-seed differences")
        if n_b is not None and n_b != n_a:
            raise ValueError(f"a paired test has n pairs: n_a = {n_a}, n_b = {n_b}")
        if sd < 0.0:
            raise ValueError(f"a standard deviation is not negative, got {sd}")
        if n_a < 2 or not math.isfinite(sd) or sd == 0.0:
            return None
        return sd / math.sqrt(n_a), float(n_a - 1)
    n_b = n_a if n_b is None else n_b
    sd_a, sd_b = sd if isinstance(sd, tuple) else (sd, sd)
    if sd_a is None or sd_b is None or n_a < 2 or n_b < 2 or not (math.isfinite(sd_a) and math.isfinite(sd_b)):
        return None
    if sd_a < 0.0 or sd_b < 0.0:
        raise ValueError(f"a standard deviation is not negative, got {sd}")
    var_a, var_b = sd_a * sd_a / n_a, sd_b * sd_b / n_b
    if var_a + var_b <= 0.0:
        return None
    df = (var_a + var_b) ** 2 / (var_a * var_a / (n_a - 1) + var_b * var_b / (n_b - 1))
    return math.sqrt(var_a + var_b), df


def _power(noncentrality: float, df: float, critical: float) -> float:
    """P(|T'| >= critical) for the noncentral t with ``df`` and ``noncentrality``: the power of the test."""
    return (1.0 - noncentral_t_cdf(critical, df, noncentrality)) + noncentral_t_cdf(-critical, df, noncentrality)


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def t_test_power(difference: float, sd: float | tuple[float, float] | None, n_a: int, n_b: int | None = None,
                 paired: bool = False, alpha: float = 0.05) -> float | None:
    """The probability that the two-sided t-test at level ``alpha`` finds a true ``difference`` in means:
    ``P(|T'| >= t_{1-alpha/2, df})``, ``T'`` noncentral t with noncentrality ``difference / SE``. Arguments and
    ``None`` as for ``minimum_detectable_difference``."""
    _check_alpha(alpha)
    spread = _standard_error(sd, n_a, n_b, paired)
    if spread is None:
        return None
    se, df = spread
    return _power(difference / se, df, student_t_quantile(1.0 - alpha / 2.0, df))


def minimum_detectable_difference(sd: float | tuple[float, float] | None, n_a: int, n_b: int | None = None,
                                  paired: bool = False, alpha: float = 0.05,
                                  power: float = DEFAULT_POWER) -> float | None:
    """The smallest true difference in means that the two-sided t-test at level ``alpha`` detects with
    probability ``power``, for seed-to-seed standard deviation(s) ``sd`` and ``n_a``, ``n_b`` seeds.

    * Paired (``paired=True``): ``sd`` is the standard deviation of the per-seed differences, ``n_a`` the number
      of pairs (``n_b`` None or equal); ``SE = sd / sqrt(n)``, ``df = n - 1``.
    * Welch: ``sd`` is one standard deviation for both arms or ``(sd_a, sd_b)``; ``n_b`` defaults to ``n_a``;
      ``SE = sqrt(sd_a^2/n_a + sd_b^2/n_b)`` with the Welch-Satterthwaite ``df`` (equal sds and seeds: the
      pooled ``2 (n - 1)``).

    Exact, not the textbook approximation: the answer is ``delta * SE`` with ``delta`` the noncentrality at
    which the noncentral t on ``df`` degrees of freedom puts mass ``power`` beyond the critical values
    ``+-t_{1-alpha/2, df}`` (found by bisection; ``core.student_t.noncentral_t_cdf``, Lenth 1989 summed as
    Benton & Krishnamoorthy 2003). Measured against ``scipy.stats.nct`` for n = 2..10 (paired and two-sample
    Student, alpha 0.05, power 0.8): the power at the returned difference is 0.8 to 1e-12. The textbook
    approximation ``(t_{1-alpha/2, df} + t_{power, df}) * SE`` would understate the difference, so overstate
    what the seeds can see: paired, by 14 % at n = 2 pairs (its true power 0.73, not 0.8), 5 % at 3 pairs,
    1.2 % at 5, 0.13 % at 10; two-sample with equal sds, by 5 % at 2 seeds a side and under 0.5 % from 4
    (the error depends on df only: df = 1, 2, 4, 9 give 14 %, 5 %, 1.2 %, 0.13 %). For Welch's test with
    unequal sds the noncentral t on the Welch-Satterthwaite df is itself the usual approximation of the
    test's power (Welch's statistic has no exact noncentral distribution).

    Returns ``None`` where no difference can be stated: ``sd`` None, zero or not finite (both zero for
    Welch), or fewer than 2 seeds (pairs) on a side. ValueError for ``alpha`` or ``power`` out of range
    (``alpha < power < 1``: at difference 0 the test already "detects" with probability ``alpha``).

    >>> round(minimum_detectable_difference(1.0, 3, paired=True), 3)  # 3 pairs, differences' sd 1
    3.264
    """
    _check_alpha(alpha)
    if not alpha < power < 1.0:
        raise ValueError(f"power must be in (alpha, 1) = ({alpha}, 1), got {power}")
    spread = _standard_error(sd, n_a, n_b, paired)
    if spread is None:
        return None
    se, df = spread
    critical = student_t_quantile(1.0 - alpha / 2.0, df)
    low, high = 0.0, critical + 2.0
    while _power(high, df, critical) < power:
        low, high = high, 2.0 * high
    for _ in range(200):  # the power rises with the noncentrality: bisection
        middle = (low + high) / 2.0
        if _power(middle, df, critical) < power:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * high:
            break
    return (low + high) / 2.0 * se
