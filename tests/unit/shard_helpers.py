"""Tiny shard sets for the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe_vae.data.sources import from_arrays
from moe_vae.data.writer import WriteOptions, write_shards


def tiny_arrays(n: int, shape=(6, 5), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n)


def write_tiny(
    out: Path,
    n: int = 400,
    per_shard: int = 50,
    record: str = "batched",
    record_size: int = 16,
    name: str = "train",
    shape: tuple[int, int] = (6, 5),
) -> tuple[str, np.ndarray, np.ndarray]:
    """n samples in n / per_shard shards; returns (brace pattern, images, labels)."""
    images, labels = tiny_arrays(n, shape)
    manifest = write_shards(
        from_arrays(images, labels, f"{name}-"),
        out,
        name,
        WriteOptions(samples_per_shard=per_shard, record=record, record_size=record_size),
        progress=False,
    )
    return str(out / manifest["pattern"]), images, labels


def key_index(key: str) -> int:
    return int(key.rsplit("-", 1)[1])
