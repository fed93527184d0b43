import math

import pytest

from lightning_modules.schedules import LRSchedule, constant, cosine, linear, triangle


def test_triangle_peaks_at_half_and_ends_at_zero():
    assert triangle(0.0) == 0.0
    assert triangle(0.25) == pytest.approx(0.5)
    assert triangle(0.5) == pytest.approx(1.0)
    assert triangle(0.75) == pytest.approx(0.5)
    assert triangle(1.0) == 0.0
    assert triangle(1.5) == 0.0  # past the budget stays decayed


def test_paper_t5_cosine_warmup_end_and_floor():
    warmup = 10000 / 65536
    schedule = LRSchedule("cosine", warmup_fraction=warmup, final=1e-5, warmup_start=0.5)
    assert schedule(0.0) == pytest.approx(0.5)  # nanoT5 starts at half the peak
    assert schedule(warmup / 2) == pytest.approx(0.75)
    assert schedule(warmup) == pytest.approx(1.0)
    mid = warmup + (1 - warmup) / 2
    assert schedule(mid) == pytest.approx(0.5)
    assert schedule(1.0) == pytest.approx(1e-5)  # the floor, reached exactly at the end
    assert schedule(0.999999) >= 1e-5


def test_linear_and_constant():
    assert linear(0.05, warmup_fraction=0.1) == pytest.approx(0.5)
    assert linear(0.1, warmup_fraction=0.1) == pytest.approx(1.0)
    assert linear(0.55, warmup_fraction=0.1) == pytest.approx(0.5)
    assert linear(1.0, warmup_fraction=0.1, final=0.1) == pytest.approx(0.1)
    assert constant(0.05, warmup_fraction=0.1) == pytest.approx(0.5)
    assert constant(0.7, warmup_fraction=0.1) == 1.0
    assert cosine(0.5) == pytest.approx(0.5) and math.isclose(cosine(1.0), 0.0, abs_tol=1e-12)


def test_bad_schedule_settings():
    with pytest.raises(ValueError, match="unknown lr schedule"):
        LRSchedule("step")
    with pytest.raises(ValueError, match="warmup_fraction"):
        LRSchedule("cosine", warmup_fraction=1.0)
