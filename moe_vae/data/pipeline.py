"""The streaming pipeline, in open_clip's order, as one function:

    shard list -> split by node -> split by worker -> tar records (bad ones skipped and counted)
    -> decode to uint8 [C, H, W] -> shuffle buffer -> batches

Every random choice is seeded from (seed, epoch, rank, worker), so a run is deterministic for a
given (seed, world size, workers). Ranks are passed in, never read from torch.distributed here.
Without resampling, each epoch shuffles the shard order with the same seed on every rank, then
deals shards out: no rank (or worker) sees a sample twice. With resampling, every (rank, worker)
draws shards with replacement for ever and the epoch length is set in steps by the caller.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from moe_vae.data.records import BadSampleCounter, Decoded, RecordDecoder


@dataclass
class StreamSpec:
    """What a worker needs to rebuild its part of the stream (picklable)."""

    urls: list[str]
    image_shape: tuple[int, int, int] | None
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    shuffle_buffer: int = 10_000
    resampled: bool = False


@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B, C, H, W]
    labels: torch.Tensor  # int64 [B], -1 = unknown
    keys: list[str]
    bad: dict[str, int] = field(default_factory=dict)  # cumulative skips of the producing worker
    worker: int = 0

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True)
        self.images = self.images.pin_memory()
        self.labels = self.labels.pin_memory()
        return self


def _rng(*parts: int) -> random.Random:
    # A string seed is hashed deterministically by random.Random (no PYTHONHASHSEED dependence).
    return random.Random("-".join(str(p) for p in parts))


def epoch_shard_order(urls: list[str], seed: int, epoch: int) -> list[str]:
    """The epoch's shard order: identical on every rank, different each epoch."""
    order = list(urls)
    _rng(seed, epoch).shuffle(order)
    return order


def split_shards(
    urls: list[str], rank: int, world_size: int, worker: int, num_workers: int
) -> list[str]:
    """Deal shards to ranks, then to that rank's workers: a partition of `urls`."""
    return urls[rank::world_size][worker::num_workers]


def _resampled(urls: list[str], rng: random.Random) -> Iterator[str]:
    while True:
        yield rng.choice(urls)


def _shuffle(samples: Iterator[Decoded], size: int, rng: random.Random) -> Iterator[Decoded]:
    """A shuffle buffer: fill to `size`, then emit a random element for each one read."""
    buf: list[Decoded] = []
    for sample in samples:
        buf.append(sample)
        if len(buf) >= size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _batches(
    samples: Iterator[Decoded], batch_size: int, counter: BadSampleCounter, worker: int
) -> Iterator[Batch]:
    """Full batches only: a worker's last partial batch is dropped (steps are planned for it)."""
    chunk: list[Decoded] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == batch_size:
            yield Batch(
                images=torch.from_numpy(np.stack([s.image for s in chunk])),
                labels=torch.tensor([s.label for s in chunk], dtype=torch.int64),
                keys=[s.key for s in chunk],
                bad=dict(counter.counts),
                worker=worker,
            )
            chunk = []


def stream_batches(
    spec: StreamSpec, epoch: int, worker: int = 0, num_workers: int = 1
) -> Iterator[Batch]:
    """One worker's batches for one epoch: the whole pipeline, top to bottom."""
    import webdataset as wds

    counter = BadSampleCounter()
    if spec.resampled:
        urls: Iterator[str] = _resampled(spec.urls, _rng(spec.seed, epoch, spec.rank, worker))
    else:
        order = epoch_shard_order(spec.urls, spec.seed, epoch)
        urls = iter(split_shards(order, spec.rank, spec.world_size, worker, num_workers))
    records = wds.tarfile_samples(({"url": u} for u in urls), handler=counter)
    samples = RecordDecoder(spec.image_shape, counter)(records)
    shuffled = _shuffle(samples, spec.shuffle_buffer, _rng(spec.seed, epoch, spec.rank, worker, 1))
    yield from _batches(shuffled, spec.batch_size, counter, worker)


class ShardStream(torch.utils.data.IterableDataset):
    """The pipeline behind a torch DataLoader: each loader worker streams its own shards."""

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec = spec
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        return stream_batches(self.spec, self.epoch, worker, num_workers)
