"""From the data config to loaders: the one place that decides where samples come from.

MNIST (the default) is written once to cached shards and read back through the same path as any
user's shards; small data then takes the in-memory fast path, large data streams.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moe_vae.config.schema import DataConfig
from moe_vae.data.cache import cache_setting, default_cache
from moe_vae.data.digest import file_digest
from moe_vae.data.loaders import (
    InMemoryLoader,
    StreamingLoader,
    fits_in_memory,
    load_in_memory,
    memory_samples,
)
from moe_vae.data.mnist import MNIST_FILES, idx_files, mnist_root
from moe_vae.data.shardlist import ShardSet, preflight, resolve
from moe_vae.data.sources import mnist_source
from moe_vae.data.writer import WriteOptions, manifest_path, write_shards
from moe_vae.errors import MoeVaeError


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return default_cache()


def _complete(mpath: Path) -> str | None:
    """The shard pattern of a manifest whose shards are all present and match their sha256."""
    try:
        manifest = json.loads(mpath.read_text())
        for shard in manifest["shards"]:
            if file_digest(mpath.parent / shard["file"], "sha256") != shard["sha256"]:
                return None
        return str(mpath.parent / manifest["pattern"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mnist_cache_dir(cfg: DataConfig) -> Path:
    """Where this config's MNIST shards live: named by how they are written and by the IDX
    files they are written from, so a data.root holding other IDX data (Fashion-MNIST, a
    modified copy) never trains from shards cached for another dataset.

    The official files keep the plain name `mnist-<record>-<samples_per_shard>` wherever they
    come from (embedded, a directory, a download); other files add a digest of their md5s.
    """
    out = cache_root(cfg) / "shards" / f"mnist-{cfg.record}-{cfg.samples_per_shard}"
    if cfg.source == "download" and cfg.verify_md5:
        # Only the official files get past download's md5 check (and read_idx's when the shards
        # are written): no need to read them here, so a complete cache still serves offline.
        return out
    md5 = {name: file_digest(path, "md5") for name, path in idx_files(mnist_root(cfg)).items()}
    if md5 == MNIST_FILES:
        return out
    tag = hashlib.sha256(json.dumps(sorted(md5.items())).encode()).hexdigest()[:16]
    return out.with_name(f"{out.name}-{tag}")


@contextmanager
def _writer_lock(out: Path, cfg: DataConfig) -> Iterator[None]:
    """One writer at a time per cache directory: every local rank of a node whose cache is
    node-local gets here at once; the others wait, then find the shards complete."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = (out / ".lock").open("a")
    except OSError as err:  # a file in the way, a read-only or special file system (/proc)
        raise MoeVaeError(
            f"{cache_setting(cfg.cache_dir)}: cannot write MNIST's shard cache "
            f"{str(out)!r}: {err.strerror or err} (expected a writable directory)"
        ) from None
    with lock as f:
        # A file system without locks (some network mounts) refuses: the writers then race,
        # which write_shards makes safe (per-process temporary names, atomic renames,
        # byte-identical shards), only wasteful.
        with suppress(OSError):
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def ensure_mnist_shards(cfg: DataConfig, progress: bool = True) -> tuple[str, str]:
    """(train, test) shard patterns of MNIST in the cache, written on first use. Safe to call
    from several processes at once (they share one writer)."""
    out = mnist_cache_dir(cfg)
    patterns = []
    for split in ("train", "test"):
        pattern = _complete(manifest_path(out, split))
        if pattern is None:
            with _writer_lock(out, cfg):
                # Checked again under the lock: another process may have just written it.
                pattern = _complete(manifest_path(out, split))
                if pattern is None:
                    source = mnist_source(mnist_root(cfg), split, cfg.verify_md5)
                    opts = WriteOptions(samples_per_shard=cfg.samples_per_shard, record=cfg.record)
                    manifest = write_shards(source, out, split, opts, progress)
                    pattern = str(out / manifest["pattern"])
        patterns.append(pattern)
    return patterns[0], patterns[1]


@dataclass
class EvalSet:
    """A labelled evaluation split held in memory (uint8 on the device)."""

    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N], -1 = unknown

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.images), batch_size):
            yield (
                self.images[start : start + batch_size],
                self.labels[start : start + batch_size],
            )


@dataclass
class Data:
    train: InMemoryLoader | StreamingLoader
    image_shape: tuple[int, int, int]
    test: EvalSet | None
    train_shards: ShardSet
    load_skipped: Counter[str] = field(default_factory=Counter)  # bad samples met while loading


def build_data(
    cfg: DataConfig,
    batch_size: int,
    seed: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> Data:
    train_spec: str | list[str]
    test_spec: str | list[str] | None
    if cfg.name == "mnist":
        train_spec, test_spec = ensure_mnist_shards(cfg, progress)
    else:
        assert cfg.train_shards is not None
        train_spec, test_spec = cfg.train_shards, cfg.test_shards
    shards = resolve(train_spec)
    image_shape = preflight(shards)
    use_memory = cfg.loader == "memory" or (
        cfg.loader == "auto"
        and fits_in_memory(shards, image_shape, cfg.memory_limit_mb, cfg.train_limit)
    )
    if cfg.train_limit and not use_memory:
        # The streaming loader reads every shard: it has no limit to honour.
        n = memory_samples(shards, cfg.train_limit)
        size_mb = (n or 0) * math.prod(image_shape) / 2**20
        raise MoeVaeError(
            f"data.train_limit={cfg.train_limit} needs the in-memory loader, but "
            f"data.loader=auto streams these shards: {n} samples of {list(image_shape)} take "
            f"{size_mb:.1f} MiB, more than data.memory_limit_mb={cfg.memory_limit_mb}; raise "
            f"data.memory_limit_mb, set data.loader=memory, or lower data.train_limit "
            f"(null streams all the data)"
        )
    skipped: Counter[str] = Counter()
    train: InMemoryLoader | StreamingLoader
    if use_memory:
        images, labels, keys, bad = load_in_memory(
            shards, image_shape, cfg.train_limit, cfg.max_bad_fraction
        )
        skipped.update(bad)
        train = InMemoryLoader(
            images.to(device), labels.to(device), keys, batch_size, seed, rank, world_size
        )
    else:
        train = StreamingLoader(
            shards,
            image_shape,
            batch_size,
            seed,
            rank=rank,
            world_size=world_size,
            num_workers=cfg.num_workers,
            shuffle_buffer=cfg.shuffle_buffer,
            resampled=cfg.resampled,
            epoch_steps=cfg.epoch_steps,
            max_bad_fraction=cfg.max_bad_fraction,
            pin_memory=device.type == "cuda",
        )
    test = None
    if test_spec:
        test_shards = resolve(test_spec)
        images, labels, _, bad = load_in_memory(
            test_shards, image_shape, cfg.test_limit, cfg.max_bad_fraction
        )
        skipped.update({f"test_{k}": v for k, v in bad.items()})
        test = EvalSet(images.to(device), labels.to(device))
    return Data(train, image_shape, test, shards, skipped)
