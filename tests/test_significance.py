"""The statistics of `train.py compare` (core/significance.py, core/student_t.py): known values by hand, the
"not testable" cases, and SciPy as the reference implementation (a test dependency only)."""

from __future__ import annotations

import doctest
import math
import statistics

import pytest

import core.significance
from core.significance import minimum_detectable_difference, paired_t_test, t_test_power, welch_t_test
from core.student_t import noncentral_t_cdf, student_t_quantile

SAMPLES = [  # (a, b): equal and unequal spreads and sizes, negative and positive differences, loss-like values
    ([1, 2, 3, 4, 5], [3, 4, 5, 6, 7]),
    ([1, 2, 3, 4, 5], [2, 4, 6, 8, 10]),
    ([3.412, 3.398, 3.431], [3.455, 3.47, 3.449]),
    ([2.91, 2.95], [2.99, 3.08, 3.02, 2.97]),
    ([4.1, 4.4, 3.9, 4.25, 4.0, 4.3], [4.2, 4.1]),
    ([0.5, 0.61, 0.55, 0.49, 0.58, 0.52, 0.6, 0.57, 0.53, 0.56], [0.51, 0.63, 0.5, 0.57, 0.59, 0.55, 0.62, 0.54,
                                                                  0.56, 0.58]),
]


def test_welch_t_test_gives_the_known_p_values():
    """Welch's test against t tables and R's t.test (moved here from test_compare.py)."""
    # equal variances, t = -2 on 8 degrees of freedom: two-sided p = 0.0805 (t tables)
    result = welch_t_test([1, 2, 3, 4, 5], [3, 4, 5, 6, 7])
    assert (result.t, result.df) == (-2.0, 8.0) and result.p_value == pytest.approx(0.0805162, abs=1e-6)
    assert (result.low, result.high) == (pytest.approx(-2 - 2.306004, abs=1e-5), pytest.approx(-2 + 2.306004, abs=1e-5))
    assert result.testable and result.reason is None and (result.test, result.n_a, result.n_b) == ("welch", 5, 5)
    # unequal variances: R's t.test(1:5, c(2, 4, 6, 8, 10)) gives t = -1.8974, df = 5.8824, p = 0.1075
    result = welch_t_test([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
    assert result.t == pytest.approx(-1.8974, abs=1e-4) and result.df == pytest.approx(5.8824, abs=1e-4)
    assert result.p_value == pytest.approx(0.1075, abs=1e-4)
    assert student_t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)  # the 95 % critical value at 1 df
    assert welch_t_test([1.0], [2.0, 3.0]) is None  # no variance from one seed


@pytest.mark.parametrize("a, b", [([3.1, 3.1], [3.2, 3.2]), ([3.1, 3.1], [3.1, 3.1]), ([0.0, 0.0, 0.0], [0.0, 0.0])])
def test_welch_without_any_spread_is_not_testable(a, b):
    """Guards against degenerate p-values: constant seeds on both sides gave p = 0 (different constants) or
    p = 1 (equal ones), as if the noise were known to be zero. Now: not testable, no p-value, no interval."""
    result = welch_t_test(a, b)
    assert result.testable is False and "noise cannot be estimated" in result.reason
    assert (result.p_value, result.low, result.high, result.t, result.df) == (None, None, None, None, None)
    assert result.detectable_difference is None
    assert result.difference == pytest.approx(sum(a) / len(a) - sum(b) / len(b))
    assert (result.n_a, result.n_b, result.confidence) == (len(a), len(b), 0.95)


def test_welch_with_one_constant_side_is_tested_on_the_other_sides_noise():
    """Only one side constant: the noise of the other side is the standard error, df = its n - 1."""
    result = welch_t_test([3.1, 3.1], [3.0, 3.2, 3.4])
    assert result.testable and result.df == pytest.approx(2.0)
    assert result.t == pytest.approx((3.1 - 3.2) / (0.2 / math.sqrt(3)))
    # df 2: p = 1 - |t| / sqrt(2 + t^2) with t = -sqrt(3)/2: 0.477767
    assert result.p_value == pytest.approx(1 - (math.sqrt(3) / 2) / math.sqrt(2.75)) == pytest.approx(0.477767, abs=1e-6)


@pytest.mark.parametrize("test", [welch_t_test, paired_t_test])
def test_a_value_that_is_not_finite_is_not_testable(test):
    """Guards against p = nan: a diverged run (nan or inf loss) makes the comparison not testable."""
    for bad in (math.nan, math.inf):
        result = test([2.0, bad, 2.2], [2.1, 2.3, 2.0])
        assert result.testable is False and "not finite" in result.reason and result.p_value is None


def test_paired_t_test_gives_the_known_values():
    """Differences [1, 2, 3]: mean 2, sd 1, t = 2 sqrt(3), df 2, p = 1 - t / sqrt(2 + t^2) = 0.0742,
    95 % interval 2 +- 4.302653 / sqrt(3) (t tables)."""
    result = paired_t_test([2, 4, 6], [1, 2, 3])
    assert (result.test, result.n_a, result.n_b, result.df, result.testable) == ("paired", 3, 3, 2.0, True)
    assert result.difference == 2.0 and result.t == pytest.approx(2 * math.sqrt(3))
    assert result.p_value == pytest.approx(1 - 2 * math.sqrt(3) / math.sqrt(14)) and round(result.p_value, 4) == 0.0742
    half = 4.302653 / math.sqrt(3)
    assert (result.low, result.high) == (pytest.approx(2 - half, abs=1e-6), pytest.approx(2 + half, abs=1e-6))
    assert result.detectable_difference == pytest.approx(minimum_detectable_difference(1.0, 3, paired=True))


@pytest.mark.parametrize("a, b", [
    ([3.1, 3.3, 3.5], [3.0, 3.2, 3.4]),  # equal differences in decimal, not quite in binary
    ([2.5, 2.7, 2.6], [2.5, 2.7, 2.6]),  # equal arms
])
def test_paired_with_constant_differences_is_not_testable(a, b):
    """Every pair differing by the same amount says nothing about the noise: no p-value (the rounding of
    3.1 - 3.0 against 3.3 - 3.2 is no noise either; taken as noise, it gave t of order 1e14)."""
    result = paired_t_test(a, b)
    assert result.testable is False and "same amount" in result.reason
    assert (result.p_value, result.low, result.high, result.t, result.df) == (None, None, None, None, None)
    assert result.difference == pytest.approx(sum(a) / 3 - sum(b) / 3)


def test_paired_needs_two_pairs_and_equal_lengths():
    assert paired_t_test([1.0], [2.0]) is None and paired_t_test([], []) is None
    with pytest.raises(ValueError, match="one value per seed"):
        paired_t_test([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_t_test([1.0, 2.0], [1.5, 2.2], confidence=95)


@pytest.mark.parametrize("a, b", SAMPLES)
def test_welch_matches_scipy(a, b):
    """p, t, df and the 95 % and 90 % intervals agree with scipy.stats.ttest_ind(equal_var=False)."""
    from scipy import stats

    reference = stats.ttest_ind(a, b, equal_var=False)
    for confidence in (0.95, 0.9):
        result = welch_t_test(a, b, confidence=confidence)
        interval = reference.confidence_interval(confidence)
        assert result.low == pytest.approx(interval.low, rel=1e-9) and result.high == pytest.approx(interval.high, rel=1e-9)
    assert result.t == pytest.approx(reference.statistic, rel=1e-12) and result.df == pytest.approx(reference.df, rel=1e-12)
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-9)


@pytest.mark.parametrize("a, b", [(a, b[:len(a)]) for a, b in SAMPLES[1:] if len(b) >= len(a)] + [  # not SAMPLES[0]:
    # its differences are all -2, where SciPy answers t = -inf, p = 0 and we answer "not testable"
    ([3.40, 3.52, 3.47, 3.61], [3.45, 3.55, 3.52, 3.60])])
def test_paired_matches_scipy(a, b):
    """p, t and the 95 % interval agree with scipy.stats.ttest_rel."""
    from scipy import stats

    reference = stats.ttest_rel(a, b)
    result = paired_t_test(a, b)
    interval = reference.confidence_interval(0.95)
    assert result.t == pytest.approx(reference.statistic, rel=1e-12) and result.df == reference.df
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    assert result.low == pytest.approx(interval.low, rel=1e-9) and result.high == pytest.approx(interval.high, rel=1e-9)


def test_student_t_quantile_matches_scipy():
    """The quantile (both halves, fractional df) agrees with scipy.stats.t.ppf."""
    from scipy import stats

    for df in (1, 1.5, 2, 3, 4.7, 9, 30, 1000):
        for probability in (0.02, 0.2, 0.5, 0.8, 0.9, 0.95, 0.975, 0.995, 0.9999):
            assert student_t_quantile(probability, df) == pytest.approx(stats.t.ppf(probability, df), rel=1e-10, abs=1e-12)
    with pytest.raises(ValueError):
        student_t_quantile(1.0, 3)


def test_noncentral_t_cdf_matches_scipy():
    """The noncentral t distribution function agrees with scipy.stats.nct.cdf to 1e-11, also for a large
    noncentrality (AS 243's first Poisson weight exp(-delta^2/2) underflows at delta > 38). SciPy 1.17 answers
    nan far in some tails (e.g. t = 12.7, df = 1, delta = -12, where the value is 1 to 1e-13): those points are
    compared with the other tail, 1 - P(T' <= t) = P(T'(-delta) <= -t), where SciPy has an answer."""
    from scipy import stats

    compared = 0
    for df in (1, 1.7, 2, 5, 9, 30, 200):
        for delta in (-12.0, -3.0, -0.5, 0.0, 0.7, 2.8, 6.0, 16.0, 45.0):
            for t in (-20.0, -4.0, -1.0, 0.0, 0.5, 2.0, 4.3, 12.7, 40.0):
                reference = stats.nct.cdf(t, df, delta)
                if math.isnan(reference):
                    reference = stats.nct.sf(-t, df, -delta)
                if math.isnan(reference):
                    continue
                compared += 1
                assert noncentral_t_cdf(t, df, delta) == pytest.approx(reference, abs=1e-11), (t, df, delta)
    assert compared >= 7 * 9 * 9 - 5


def _scipy_power(difference: float, se: float, df: float, alpha: float = 0.05) -> float:
    from scipy import stats

    critical, delta = stats.t.ppf(1 - alpha / 2, df), difference / se
    # the lower tail P(T' <= -c) as P(T'(-delta) >= c): scipy's nct.cdf(-c, df, delta) is nan far in the tail
    return stats.nct.sf(critical, df, delta) + stats.nct.sf(critical, df, -delta)


@pytest.mark.parametrize("n", range(2, 11))
def test_minimum_detectable_difference_has_the_stated_power_by_scipy(n):
    """At the returned difference, scipy.stats.nct gives the power 0.8 to 1e-10: paired (df = n - 1), two-sample
    with equal sds (df = 2 (n - 1)), Welch with unequal sds and seeds (Welch-Satterthwaite df)."""
    mde = minimum_detectable_difference(0.3, n, paired=True)
    assert _scipy_power(mde, 0.3 / math.sqrt(n), n - 1) == pytest.approx(0.8, abs=1e-10)
    mde = minimum_detectable_difference(0.3, n, n)
    assert _scipy_power(mde, 0.3 * math.sqrt(2 / n), 2 * (n - 1)) == pytest.approx(0.8, abs=1e-10)
    n_b = n + 3
    var_a, var_b = 0.3**2 / n, 0.1**2 / n_b
    df = (var_a + var_b) ** 2 / (var_a**2 / (n - 1) + var_b**2 / (n_b - 1))
    mde = minimum_detectable_difference((0.3, 0.1), n, n_b, alpha=0.1, power=0.9)
    assert _scipy_power(mde, math.sqrt(var_a + var_b), df, alpha=0.1) == pytest.approx(0.9, abs=1e-10)
    assert t_test_power(mde, (0.3, 0.1), n, n_b, alpha=0.1) == pytest.approx(0.9, abs=1e-10)


def test_minimum_detectable_difference_known_values_and_shape():
    """Large n: the normal approximation (z_0.975 + z_0.8) sd sqrt(2/n) = 2.8016 sd sqrt(2/n); the difference
    scales with sd, shrinks with more seeds and is smaller paired (on the same sd) than unpaired."""
    assert minimum_detectable_difference(1.0, 5000) == pytest.approx(2.8016 * math.sqrt(2 / 5000), rel=1e-3)
    assert minimum_detectable_difference(2.0, 4) == pytest.approx(2 * minimum_detectable_difference(1.0, 4))
    sizes = [minimum_detectable_difference(1.0, n) for n in range(2, 8)]
    assert sizes == sorted(sizes, reverse=True)
    assert minimum_detectable_difference(1.0, 3, paired=True) == pytest.approx(3.2640, abs=1e-4)
    assert t_test_power(0.0, 1.0, 4) == pytest.approx(0.05)  # no difference: the test's level


def test_minimum_detectable_difference_is_none_where_undefined():
    for sd, n_a, n_b in ((None, 5, None), (0.0, 5, None), ((0.0, 0.0), 3, 4), (1.0, 1, None), ((1.0, 1.0), 5, 1),
                         (math.nan, 4, None)):
        assert minimum_detectable_difference(sd, n_a, n_b) is None
    assert minimum_detectable_difference(0.0, 4, paired=True) is None
    assert minimum_detectable_difference(1.0, 1, paired=True) is None
    assert minimum_detectable_difference((0.0, 0.2), 3, 4) is not None  # one side's noise is enough
    for bad in ({"alpha": 0.0}, {"power": 0.05}, {"power": 1.0}):
        with pytest.raises(ValueError):
            minimum_detectable_difference(1.0, 4, **bad)
    with pytest.raises(ValueError):
        minimum_detectable_difference(1.0, 4, 5, paired=True)


def test_every_testable_result_states_what_it_could_detect():
    """The results carry the minimum detectable difference from the observed sds at alpha = 1 - confidence."""
    a, b = SAMPLES[2]
    result = welch_t_test(a, b, confidence=0.9)
    assert result.detectable_difference == pytest.approx(minimum_detectable_difference(
        (statistics.stdev(a), statistics.stdev(b)), len(a), len(b), alpha=0.1))


def test_the_docstring_examples_hold():
    """The numbers in core/significance.py's docstrings are right."""
    assert doctest.testmod(core.significance).failed == 0
