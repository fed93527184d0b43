"""The downstream reference scores (``studies/references.py``): majority class, TF-IDF, lead-N, their cache."""

from __future__ import annotations

import random

import pytest

from studies import references
from studies.references import (
    choose_lead_n,
    lead,
    lead_n_means,
    lead_n_scores,
    majority_scores,
    rouge_l,
    task_references,
    texts_of,
    tfidf_scores,
)


def _separable_rows(counts: list[int], rng: random.Random) -> list[dict]:
    """Each class has its own 10 words; every text: 4 of its class's words and 6 of 30 shared noise words."""
    labels = [label for label, count in enumerate(counts) for _ in range(count)]
    rng.shuffle(labels)
    noise = [f"noise{i}" for i in range(30)]
    rows = []
    for label in labels:
        words = rng.choices([f"class{label}word{i}" for i in range(10)], k=4) + rng.choices(noise, k=6)
        rng.shuffle(words)
        rows.append({"text_a": " ".join(words), "label": label})
    return rows


def _separable_task() -> tuple[list[dict], list[dict]]:
    rng = random.Random(0)
    return _separable_rows([110, 100, 90], rng), _separable_rows([55, 50, 45], rng)  # 300 train, 150 validation


def test_tfidf_beats_the_majority_class_on_a_separable_task():
    train, validation = _separable_task()
    args = ([r["label"] for r in train], [r["label"] for r in validation], ("accuracy", "f1_macro"), 3)
    majority = majority_scores(*args)
    # training counts 110/100/90: predict class 0 everywhere; 55 of the 150 validation labels are 0
    assert majority["validation/accuracy"] == pytest.approx(100 * 55 / 150, abs=1e-4)
    # F1 of class 0: P = 55/150, R = 1, F = 2PR/(P+R) = 110/205; classes 1 and 2: 0; macro: the mean of three
    assert majority["validation/f1_macro"] == pytest.approx(100 * (110 / 205) / 3, abs=1e-4)
    tfidf = tfidf_scores(texts_of(train), args[0], texts_of(validation), args[1], args[2], 3, seed=0)
    assert tfidf["validation/accuracy"] > 90
    assert tfidf["validation/f1_macro"] > 90
    assert tfidf == tfidf_scores(texts_of(train), args[0], texts_of(validation), args[1], args[2], 3, seed=0)


def test_majority_class_on_a_hand_made_list():
    # train [0, 1, 1, 2]: 1 is the most frequent; eval [1, 1, 0, 2]: 2 of 4 right
    assert majority_scores([0, 1, 1, 2], [1, 1, 0, 2], ("accuracy",), 3) == {"validation/accuracy": 50.0}
    # a tie (0 and 1 twice each) goes to the smaller label: 0, right once in 4; the key's split is an argument
    assert majority_scores([1, 0, 1, 0], [1, 1, 0, 1], ("accuracy",), 2, split="test") == {"test/accuracy": 25.0}


def test_regression_majority_is_the_training_mean_with_zero_correlation():
    scores = majority_scores([1.0, 2.0, 4.5], [0.5, 3.0, 4.0, 5.0], ("pearson", "spearman"), 1)
    assert scores == {"validation/pearson": 0.0, "validation/spearman": 0.0}


def test_lead_n_on_a_hand_made_example():
    train_sources = ["the cat sat on the mat today", "A dog ran, in the park at noon."]
    train_targets = ["the cat sat", "a dog ran"]
    assert choose_lead_n(train_sources, train_targets) == 3  # lead-3 is each headline exactly: Rouge-L 100
    scores = lead_n_scores(train_sources, train_targets, ["Birds fly over the old town at dawn"],
                           ["birds fly south at dawn"])
    # prediction "Birds fly over" -> [birds, fly, over]; reference [birds, fly, south, at, dawn]; LCS = 2
    # P = 2/3, R = 2/5, F = 2PR/(P+R) = (8/15) / (16/15) = 1/2
    assert scores["n"] == 3
    assert scores["validation/rougeL"] == pytest.approx(50.0, abs=1e-6)
    assert set(scores) == {"n", "validation/rougeL"}
    # a tie: every N >= 2 takes the whole two-word source; the smallest wins
    assert choose_lead_n(["alpha beta"], ["alpha beta"]) == 2
    assert lead("one  two\tthree four", 3) == "one two three"


def test_exact_lead_rouge_matches_torchmetrics():
    rng = random.Random(1)
    vocabulary = ["U.S.", "stocks", "fall", "--", "Oil's", "price", "rises", "again", "in", "2005", "the", "a",
                  "Bank", "rates", "cut", "(BBC)", "e-mail", "café", "up", "down"]
    sources = [" ".join(rng.choices(vocabulary, k=rng.randint(0, 30))) for _ in range(25)]
    targets = [" ".join(rng.choices(vocabulary, k=rng.randint(0, 8))) for _ in range(25)]
    candidates = range(1, 21)
    means = lead_n_means(sources, targets, candidates)
    for n in candidates:
        assert means[n] == pytest.approx(rouge_l([lead(s, n) for s in sources], targets), abs=1e-4)
    assert choose_lead_n(sources, targets, candidates) == max(candidates, key=lambda n: (means[n], -n))


def test_texts_of_joins_pairs():
    import datasets

    rows = [{"text_a": "Is it raining?", "text_b": "It is sunny.", "label": 0}]
    assert texts_of(rows) == ["Is it raining? \n It is sunny."]
    assert texts_of(datasets.Dataset.from_list(rows)) == ["Is it raining? \n It is sunny."]
    assert texts_of([{"text_a": "only one", "label": 1}]) == ["only one"]
    assert texts_of(datasets.Dataset.from_list([{"text_a": "only one", "label": 1}])) == ["only one"]


def _refuse(*args, **kwargs):
    raise AssertionError("the cache was not used")


def test_task_references_are_cached(tmp_path, monkeypatch):
    train, validation = _separable_task()
    first = task_references("tweets", {"train": train, "validation": validation}, 300, 150, cache_dir=tmp_path)
    assert set(first) == {"majority", "tfidf"}
    assert set(first["tfidf"]) == {"validation/accuracy", "validation/f1_macro"}
    assert first["tfidf"]["validation/accuracy"] > 90
    files = list((tmp_path / "downstream" / "references").glob("tweets-*.json"))
    assert len(files) == 1 and len(files[0].stem) == len("tweets-") + 16
    monkeypatch.setattr(references, "_fit", _refuse)
    monkeypatch.setattr(references, "majority_scores", _refuse)
    assert task_references("tweets", {"train": train, "validation": validation}, 300, 150, cache_dir=tmp_path) == first
    with pytest.raises(AssertionError, match="cache"):  # other data: another key, computed afresh
        task_references("tweets", {"train": train[1:], "validation": validation}, 300, 150, cache_dir=tmp_path)


def test_generation_and_regression_references(private_cache, monkeypatch):
    pairs = {"train": [{"source": "the cat sat on the mat", "target": "the cat sat"}],
             "validation": [{"source": "Birds fly over the old town at dawn", "target": "birds fly south at dawn"}]}
    assert task_references("headlines", pairs, 1, 1) == {"lead_n": {"n": 3, "validation/rougeL": 50.0}}
    assert list((private_cache / "downstream" / "references").glob("headlines-*.json"))  # the default cache dir
    monkeypatch.setattr(references, "choose_lead_n", _refuse)
    assert task_references("headlines", pairs, 1, 1)["lead_n"]["n"] == 3
    rng = random.Random(2)
    rows = [{"text_a": f"w{i} x{rng.randint(0, 9)}", "text_b": f"w{i} y", "label": float(i % 5)} for i in range(40)]
    scores = task_references("stsb", {"train": rows[:30], "validation": rows[30:]}, 30, 10)
    assert scores["majority"] == {"validation/pearson": 0.0, "validation/spearman": 0.0}
    assert set(scores["tfidf"]) == {"validation/pearson", "validation/spearman"}
