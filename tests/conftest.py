"""Shared fixtures: a private cache for every test, a generated corpus (helpers live in ``helpers.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import make_corpus


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Every test writes caches under a per-session temporary directory, never into ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "ntng-cache"
    monkeypatch.setenv("NTNG_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(autouse=True)
def run_seed_restored():
    """``seed_everything`` records the run's seed in ``PL_GLOBAL_SEED`` (``core/seeds.py``), which the data order,
    the masks and the draws follow: a test's seed must not leak into the tests after it."""
    before = os.environ.get("PL_GLOBAL_SEED")
    yield
    if before is None:
        os.environ.pop("PL_GLOBAL_SEED", None)
    else:
        os.environ["PL_GLOBAL_SEED"] = before


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", documents=400)


def pytest_collection_modifyitems(items):
    """A test that starts a DDP process group is slow too: ``-m "not slow"`` (the fast tier) leaves it out."""
    for item in items:
        if item.get_closest_marker("ddp") is not None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
