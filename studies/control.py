"""The random-initialisation control of ``train.py evaluate --control random-init``, and the pre-training gain.

A downstream score means little alone: a small network fine-tuned from random weights can score well on an
easy task. The control fine-tunes, with the same recipe and the same seeds, a randomly initialised copy of
the same architecture (the export's ``config.json``, fresh weights drawn with the fine-tuning seed, the same
tokenizer). The **pre-training gain** is pre-trained minus control, paired by seed: its mean, 95 % interval
and the paired t-test's two-sided p-value over seeds (``core.significance.paired_t_test``).
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.significance import TTestResult, paired_t_test

__all__ = ["CONTROLS", "pretraining_gain", "random_init_copy", "seed_scores", "suite_seed_scores", "with_test"]

CONTROLS = ("random-init",)
_WEIGHT_FILES = (".safetensors", ".bin")


def random_init_copy(pretrained: Path, output: Path, seed: int) -> Path:
    """A copy of the export at ``pretrained`` with the same ``config.json`` and tokenizer and fresh weights,
    initialised as ``transformers`` initialises that architecture, from ``torch.manual_seed(seed)``."""
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(pretrained)
    model_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForMaskedLM
    output.mkdir(parents=True, exist_ok=True)
    for item in pretrained.iterdir():  # the tokenizer's files and the model card; not the weights
        if item.is_file() and item.suffix not in _WEIGHT_FILES:
            shutil.copy2(item, output / item.name)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = model_class.from_config(config)
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(output)
    return output


def seed_scores(summary: dict[str, Any]) -> dict[str, float]:
    """Seed -> the mean of a task's reported scores for that seed (``summary``: one task of an evaluate result)."""
    by_seed = [entry["by_seed"] for entry in summary["reported"].values()]
    return {seed: statistics.fmean(scores[seed] for scores in by_seed) for seed in by_seed[0]}


def suite_seed_scores(tasks: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Seed -> the suite average for that seed (every reported score of every task, as the suite average takes)."""
    entries = [entry["by_seed"] for summary in tasks.values() for entry in summary["reported"].values()]
    if not entries:
        return {}
    return {seed: statistics.fmean(scores[seed] for scores in entries) for seed in entries[0]}


def pretraining_gain(pretrained: dict[str, float], control: dict[str, float], confidence: float = 0.95) -> dict[str, Any]:
    """Pre-trained minus control, paired by seed (the keys): the mean difference, its ``confidence`` interval
    and the paired t-test's p-value (``None`` with one seed, or when every seed differs by the same amount)."""
    seeds = sorted(set(pretrained) & set(control), key=str)
    if not seeds:
        raise UserError("no seed was fine-tuned both from the pre-trained weights and from the control")
    a, b = [pretrained[s] for s in seeds], [control[s] for s in seeds]
    gain = {"gain": statistics.fmean(x - y for x, y in zip(a, b, strict=True)), "low": None, "high": None,
            "p_value": None, "seeds": len(seeds), "confidence": confidence, "test": "paired t-test over seeds"}
    return with_test(gain, paired_t_test(a, b, confidence), "one seed: no interval or p-value (give --seeds 0,1,2)")


def with_test(gain: dict[str, Any], test: TTestResult | None, untested: str) -> dict[str, Any]:
    """``gain`` with the test's interval and p-value, or a ``note`` saying why there are none (``untested`` when
    there were too few values to test)."""
    if test is None:
        gain["note"] = untested
    elif not test.testable:
        gain["note"] = test.reason
    else:
        gain.update(low=test.low, high=test.high, p_value=test.p_value)
    return gain
