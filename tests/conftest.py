"""Shared fixtures: a generated corpus with real structure, a private cache, tiny configurations."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the committee", "a small bird", "the river"]
_VERBS = ["sees", "likes", "follows", "reads", "builds", "finds", "watches", "crosses"]
_OBJECTS = ["the house", "a red ball", "the long road", "an apple", "the bridge", "a letter", "the garden"]
_TAILS = ["in the morning", "every day", "with great care", "after dinner", "near the sea", "again"]


def make_corpus(path: Path, documents: int, seed: int = 0) -> Path:
    """Write ``documents`` paragraphs of simple, learnable English sentences, one blank line apart."""
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(documents):
        sentences = [
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."
            for _ in range(rng.randint(3, 8))
        ]
        paragraphs.append(" ".join(sentences))
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Every test writes caches under a per-session temporary directory, never into ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "ntng-cache"
    monkeypatch.setenv("NTNG_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", documents=400)


def tiny_mlm_data_args(corpus: Path, **overrides) -> dict:
    args = dict(
        source="files",
        data_files=str(corpus),
        vocab_size=200,
        seq_len=32,
        batch_size=16,
        validation_fraction=0.05,
        max_validation_sequences=64,
    )
    args.update(overrides)
    return args


def tiny_bert_args(**overrides) -> dict:
    args = dict(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=200, max_seq_len=32)
    args.update(overrides)
    return args
