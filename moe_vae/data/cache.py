"""Where moe-vae keeps what it can rebuild (MNIST downloads, MNIST shards)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache() -> Path:
    """$MOE_VAE_CACHE, else $XDG_CACHE_HOME/moe_vae, else ~/.cache/moe_vae.

    moe-vae's own variable comes first so a test session (or a cluster job) can move this cache
    without moving every other tool's (torch's compiled extensions live under XDG_CACHE_HOME).
    """
    if os.environ.get("MOE_VAE_CACHE"):
        return Path(os.environ["MOE_VAE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moe_vae"


def cache_setting(cache_dir: str | None) -> str:
    """The setting that put the cache where it is, for an error about it: the one to change."""
    if cache_dir:
        return f"data.cache_dir {cache_dir!r}"
    if os.environ.get("MOE_VAE_CACHE"):
        return f"MOE_VAE_CACHE {os.environ['MOE_VAE_CACHE']!r}"
    return f"the cache directory {str(default_cache())!r} (set data.cache_dir or MOE_VAE_CACHE)"
