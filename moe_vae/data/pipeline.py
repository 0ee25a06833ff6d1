"""The streaming pipeline, in open_clip's order, as one function:

    shard list -> split by node -> split by worker -> tar records (bad ones skipped and counted)
    -> decode to uint8 [C, H, W] -> shuffle buffer -> batches

Every random choice is seeded from (seed, epoch, rank, worker), so a run is deterministic for a
given (seed, world size, workers). Ranks are passed in, never read from torch.distributed here.
Without resampling, each epoch shuffles the shard order with the same seed on every rank, then
deals shards out: no rank (or worker) sees a sample twice. With resampling, every (rank, worker)
draws shards with replacement for ever and the epoch length is set in steps by the caller.

Shards are read one at a time, each to its end: where a shard's sample count is known, what it
lost (a truncated stream, a record that cannot be read) is counted sample by sample.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from moe_vae.data.records import BadSampleCounter, Chunk, RecordDecoder
from moe_vae.data.shardlist import ShardError, http_status


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
    counts: list[int] | None = None  # samples per shard, when known (by position in `urls`)
    # Samples per item a worker hands to the main process (many batches: fewer, larger transfers).
    samples_per_item: int = 8192


@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B, C, H, W]
    labels: torch.Tensor  # int64 [B], -1 = unknown
    keys: list[str]
    bad: dict[str, int] = field(default_factory=dict)  # cumulative skips of the producing worker
    worker: int = 0
    index: torch.Tensor | None = None  # in-memory data: the samples' indices, on the device
    # A worker's error, raised by the trainer as one line (an exception raised in a worker
    # reaches it wrapped in the worker's traceback).
    error: str = ""

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True)
        self.images = self.images.pin_memory()
        self.labels = self.labels.pin_memory()
        return self


def _rng(*parts: int) -> random.Random:
    # A string seed is hashed deterministically by random.Random (no PYTHONHASHSEED dependence).
    return random.Random("-".join(str(p) for p in parts))


def _np_rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng(_rng(*parts).getrandbits(64))


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


def failed_shards_limit(num_shards: int) -> int:
    """Shards in a row without a usable sample after which a resampled stream gives up (a
    server gone away): twice the shard count, so that a few bad shards drawn in a row do not
    stop a run whose other shards are fine, and at least 10."""
    return max(10, 2 * num_shards)


def read_shards(
    urls: Iterable[str],
    decoder: RecordDecoder,
    counter: BadSampleCounter,
    expected: dict[str, int] | None = None,
    max_failed_in_row: int | None = None,
) -> Iterator[Chunk]:
    """The decoded records of each shard in turn. A shard whose sample count is `expected`
    and that neither yielded nor counted all of them is charged the difference as
    `missing_samples` when it ends: a truncated shard, or a lost member, counts every sample it
    took with it (webdataset reports either as one error). `max_failed_in_row` shards in a row
    with no usable sample raise a ShardError naming the last one."""
    import webdataset as wds

    failed_in_row = 0
    for url in urls:
        bad_before, good = counter.total, 0
        counter.last_error = ""
        for chunk in decoder(wds.tarfile_samples([{"url": url}], handler=counter)):
            good += len(chunk)
            yield chunk
        if expected is not None and url in expected:
            missing = expected[url] - good - (counter.total - bad_before)
            if missing > 0:
                counter.add("missing_samples", missing)
        failed_in_row = 0 if good else failed_in_row + 1
        if max_failed_in_row is not None and failed_in_row >= max_failed_in_row:
            why = http_status(url) or counter.last_error
            why = why or ", ".join(f"{k} {v}" for k, v in counter.counts.items())
            raise ShardError(
                f"{failed_in_row} shards in a row gave no usable sample, the last {url!r} "
                f"({why or 'no samples'}): expected readable shards; is the server up?"
            )


def _resampled(urls: list[str], rng: random.Random) -> Iterator[str]:
    while True:
        yield rng.choice(urls)


def _concat(chunks: list[Chunk]) -> Chunk:
    if len(chunks) == 1:
        return chunks[0]
    return Chunk(
        np.concatenate([c.images for c in chunks]),
        np.concatenate([c.labels for c in chunks]),
        np.concatenate([c.keys for c in chunks]),
    )


def _take(c: Chunk, idx: np.ndarray | slice) -> Chunk:
    return Chunk(c.images[idx], c.labels[idx], c.keys[idx])


def _shuffle(chunks: Iterator[Chunk], size: int, rng: np.random.Generator) -> Iterator[Chunk]:
    """A shuffle buffer of `size` samples, vectorised per record: once full, each arriving
    record of k samples swaps places with k random buffered samples, which are emitted."""
    pending: list[Chunk] = []
    filled = 0
    buf: Chunk | None = None
    for chunk in chunks:
        if buf is None:
            pending.append(chunk)
            filled += len(chunk)
            if filled >= size:  # the buffer is full: keep `size` samples, emit the overflow
                allc = _concat(pending)
                perm = rng.permutation(len(allc))
                buf = Chunk(
                    *(
                        a.copy()
                        for a in (
                            allc.images[perm[:size]],
                            allc.labels[perm[:size]],
                            allc.keys[perm[:size]].astype(object),
                        )
                    )
                )
                if len(allc) > size:
                    yield _take(allc, perm[size:])
                pending = []
            continue
        k = len(chunk)
        if k >= size:  # a record larger than the buffer: mix it in whole
            allc = _concat([buf, chunk])
            perm = rng.permutation(len(allc))
            buf = _take(allc, perm[:size])
            yield _take(allc, perm[size:])
            continue
        idx = rng.choice(size, size=k, replace=False)
        out = Chunk(buf.images[idx].copy(), buf.labels[idx].copy(), buf.keys[idx].copy())
        buf.images[idx], buf.labels[idx], buf.keys[idx] = chunk.images, chunk.labels, chunk.keys
        yield out
    rest = buf if buf is not None else (_concat(pending) if pending else None)
    if rest is not None and len(rest):
        yield _take(rest, rng.permutation(len(rest)))


def _batches(
    chunks: Iterator[Chunk], batch_size: int, per_item: int, counter: BadSampleCounter, worker: int
) -> Iterator[Batch]:
    """Full batches only (a worker's last partial batch is dropped: steps are planned for it),
    `per_item` of them in one Batch so that few large tensors cross the worker boundary."""
    want = batch_size * per_item
    pending: list[Chunk] = []
    have = 0
    for chunk in chunks:
        pending.append(chunk)
        have += len(chunk)
        if have >= want:
            allc = _concat(pending)
            yield _as_batch(_take(allc, slice(0, want)), counter, worker)
            rest = _take(allc, slice(want, None))
            pending, have = ([rest], len(rest)) if len(rest) else ([], 0)
    full = (have // batch_size) * batch_size
    if full:
        yield _as_batch(_take(_concat(pending), slice(0, full)), counter, worker)
    # A last, empty item: the worker's final bad-sample counts reach the main process even when
    # it produced no batch at all.
    yield _empty(counter, worker)


def _empty(counter: BadSampleCounter, worker: int, error: str = "") -> Batch:
    return Batch(
        torch.empty(0, dtype=torch.uint8),
        torch.empty(0, dtype=torch.int64),
        [],
        dict(counter.counts),
        worker,
        error=error,
    )


def _as_batch(c: Chunk, counter: BadSampleCounter, worker: int) -> Batch:
    return Batch(
        images=torch.from_numpy(np.ascontiguousarray(c.images)),
        labels=torch.from_numpy(np.ascontiguousarray(c.labels, dtype=np.int64)),
        keys=[str(k) for k in c.keys],
        bad=dict(counter.counts),
        worker=worker,
    )


def split_batch(batch: Batch, batch_size: int) -> Iterator[Batch]:
    """A worker's multi-batch item -> the training batches it holds, in order."""
    for start in range(0, len(batch.keys), batch_size):
        end = start + batch_size
        yield Batch(
            batch.images[start:end],
            batch.labels[start:end],
            batch.keys[start:end],
            batch.bad,
            batch.worker,
        )


def stream_batches(
    spec: StreamSpec, epoch: int, worker: int = 0, num_workers: int = 1
) -> Iterator[Batch]:
    """One worker's batches for one epoch: the whole pipeline, top to bottom."""
    counter = BadSampleCounter()
    limit = None
    if spec.resampled:
        urls: Iterator[str] = _resampled(spec.urls, _rng(spec.seed, epoch, spec.rank, worker))
        # An endless stream whose shards all fail would never yield a batch: give up instead.
        limit = failed_shards_limit(len(spec.urls))
    else:
        # Each shard is read once per epoch: its losses count against data.max_bad_fraction.
        order = epoch_shard_order(spec.urls, spec.seed, epoch)
        urls = iter(split_shards(order, spec.rank, spec.world_size, worker, num_workers))
    expected = dict(zip(spec.urls, spec.counts, strict=True)) if spec.counts else None
    decoder = RecordDecoder(spec.image_shape, counter)
    chunks = read_shards(urls, decoder, counter, expected, limit)
    shuffled = _shuffle(chunks, spec.shuffle_buffer, _np_rng(spec.seed, epoch, spec.rank, worker))
    per_item = max(1, spec.samples_per_item // spec.batch_size)
    try:
        yield from _batches(shuffled, spec.batch_size, per_item, counter, worker)
    except ShardError as err:
        yield _empty(counter, worker, f"rank {spec.rank} loader worker {worker}: {err}")


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
