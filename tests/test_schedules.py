"""Learning-rate schedules of budget progress tau: triangle, cosine, linear, constant, warm-up-stable-decay."""

import math

import pytest
import torch

from helpers import fit_tiny_bert
from lightning_modules.schedules import LRSchedule, constant, cosine, linear, triangle, wsd


def test_triangle_peaks_at_half_and_ends_at_zero():
    assert triangle(0.0) == 0.0
    assert triangle(0.25) == pytest.approx(0.5)
    assert triangle(0.5) == pytest.approx(1.0)
    assert triangle(0.75) == pytest.approx(0.5)
    assert triangle(1.0) == 0.0
    assert triangle(1.5) == 0.0  # past the budget stays decayed


def test_the_paper_t5_cosine_starts_at_half_peaks_after_the_warmup_and_ends_at_its_floor():
    warmup = 10000 / 65536
    schedule = LRSchedule("cosine", warmup_fraction=warmup, final=1e-5, warmup_start=0.5)
    assert schedule(0.0) == pytest.approx(0.5)  # nanoT5 starts at half the peak
    assert schedule(warmup / 2) == pytest.approx(0.75)
    assert schedule(warmup) == pytest.approx(1.0)
    mid = warmup + (1 - warmup) / 2
    assert schedule(mid) == pytest.approx(0.5)
    assert schedule(1.0) == pytest.approx(1e-5)  # the floor, reached exactly at the end
    assert schedule(0.999999) >= 1e-5


def test_linear_decays_and_constant_holds_after_the_warmup():
    assert linear(0.05, warmup_fraction=0.1) == pytest.approx(0.5)
    assert linear(0.1, warmup_fraction=0.1) == pytest.approx(1.0)
    assert linear(0.55, warmup_fraction=0.1) == pytest.approx(0.5)
    assert linear(1.0, warmup_fraction=0.1, final=0.1) == pytest.approx(0.1)
    assert constant(0.05, warmup_fraction=0.1) == pytest.approx(0.5)
    assert constant(0.7, warmup_fraction=0.1) == 1.0
    assert cosine(0.5) == pytest.approx(0.5) and math.isclose(cosine(1.0), 0.0, abs_tol=1e-12)


def test_an_unknown_schedule_or_a_warmup_of_the_whole_budget_is_refused():
    with pytest.raises(ValueError, match="unknown lr schedule"):
        LRSchedule("step")
    with pytest.raises(ValueError, match="warmup_fraction"):
        LRSchedule("cosine", warmup_fraction=1.0)


def test_wsd_warms_up_holds_and_decays_at_its_breakpoints():
    schedule = LRSchedule(name="wsd", warmup_fraction=0.1, decay_fraction=0.2, final=0.0)
    assert [schedule(t) for t in (0.0, 0.05, 0.1, 0.5, 0.8)] == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0])
    assert schedule(0.9) == pytest.approx(0.5) and schedule(1.0) == 0.0
    assert wsd(0.9, 0.1, 0.2, decay_shape="cosine") == pytest.approx(0.5)
    assert wsd(0.85, 0.1, 0.2, decay_shape="sqrt") == pytest.approx(1 - math.sqrt(0.25))
    assert wsd(1.0, 0.1, 0.2, final=0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="decay_fraction"):
        LRSchedule(name="wsd", warmup_fraction=0.5, decay_fraction=0.6)


def test_a_tiny_fit_with_wsd_lowers_the_loss_and_a_resume_continues_identically(corpus_file, tmp_path):
    def adamw(params):
        return torch.optim.AdamW(params, lr=5e-3, weight_decay=0.01)

    schedule = dict(lr_schedule="wsd", warmup_fraction=0.1)
    _, _, full = fit_tiny_bert(tmp_path / "full", corpus_file, adamw, every=8, **schedule)
    losses = [loss for _, loss in full.losses]
    assert sum(losses[-4:]) < sum(losses[:4]) - 0.2, losses
    _, _, resumed = fit_tiny_bert(tmp_path / "resumed", corpus_file, adamw, **schedule,
                                  ckpt_path=tmp_path / "full" / "ckpt" / "step=8.ckpt")
    after = [loss for step, loss in full.losses if step > 8]
    assert [loss for _, loss in resumed.losses] == pytest.approx(after, rel=1e-5)
