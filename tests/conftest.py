"""Fixtures shared by the tests that run `python launch.py`."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One prepared-corpus cache for the whole session: every launched run tokenizes the same
    standard-library corpus, so it is prepared once (the cache is safe under concurrent ranks)."""
    return tmp_path_factory.mktemp("data_cache")
