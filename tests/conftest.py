"""Shared test fixtures: repository paths and the tiny config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session", autouse=True)
def _shard_cache(tmp_path_factory: pytest.TempPathFactory):
    """One MNIST shard cache for the whole session (and its subprocesses), not the user's.

    Only moe-vae's own cache moves: XDG_CACHE_HOME stays, so DeepSpeed's compiled CPU comm op
    (in torch's extension cache) is built once per machine, not once per test session.
    """
    old = os.environ.get("MOE_VAE_CACHE")
    os.environ["MOE_VAE_CACHE"] = str(tmp_path_factory.mktemp("cache") / "moe_vae")
    yield
    if old is None:
        os.environ.pop("MOE_VAE_CACHE", None)
    else:
        os.environ["MOE_VAE_CACHE"] = old


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def tiny_config() -> Path:
    return CONFIGS / "tiny.yaml"
