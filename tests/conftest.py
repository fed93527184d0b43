"""Shared fixtures: a private cache for every test, a generated corpus (helpers live in ``helpers.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import make_corpus


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Every test writes caches under a per-session temporary directory, never into ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "ntng-cache"
    monkeypatch.setenv("NTNG_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", documents=400)


def pytest_collection_modifyitems(items):
    """A test that starts a DDP process group is slow too: ``-m "not slow"`` (the fast tier) leaves it out."""
    for item in items:
        if item.get_closest_marker("ddp") is not None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
