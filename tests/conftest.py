"""Shared test fixtures: repository paths and the tiny config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session", autouse=True)
def _shard_cache(tmp_path_factory: pytest.TempPathFactory):
    """One MNIST shard cache for the whole session (and its subprocesses), not the user's."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def tiny_config() -> Path:
    return CONFIGS / "tiny.yaml"
