"""Batch loaders behind one interface: streamed from shards, or held in (GPU) memory.

Both give every rank the same number of full batches per epoch (no rank runs out early and
hangs a collective; a streamed rank short of its plan repeats batches from its epoch's start,
see StreamingLoader.epoch_batches), deterministic for a given (seed, world size, workers), and a
position (epoch, batches consumed) to resume from exactly. No sample comes twice in an epoch,
except with data.resampled, where every rank and worker draws shards with replacement, and in a
refilled epoch.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import random
import signal
from collections import Counter
from collections.abc import Generator, Iterator
from typing import Any

import numpy as np
import torch

from moe_vae.data.pipeline import (
    Batch,
    ShardStream,
    StreamSpec,
    epoch_shard_order,
    read_shards,
    split_batch,
    split_shards,
)
from moe_vae.data.records import BadSampleCounter, RecordDecoder
from moe_vae.data.shardlist import ShardError, ShardSet
from moe_vae.errors import MoeVaeError


class BadDataError(MoeVaeError):
    """More bad samples than data.max_bad_fraction allows."""


class BadSampleReport:
    """Skipped samples by reason, against samples used, with the configured ceiling. A
    streaming loader keeps one per epoch (reset when the epoch starts), so the ceiling holds
    for every epoch on its own, and `counts` are the epoch's."""

    MIN_SEEN = 10_000  # mid-epoch checks wait for this many samples; epoch ends always check

    def __init__(self, max_fraction: float) -> None:
        self.max_fraction = max_fraction
        self.reset()

    def reset(self) -> None:
        self.counts: Counter[str] = Counter()
        self.good = 0
        self.refilled_steps = 0  # steps a short stream took from its epoch's start again

    @property
    def bad(self) -> int:
        return sum(self.counts.values())

    def check(self, final: bool = False) -> None:
        seen = self.good + self.bad
        if not seen or (not final and seen < self.MIN_SEEN):
            return
        if self.bad / seen > self.max_fraction:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
            raise BadDataError(
                f"{self.bad} of {seen} samples were bad ({reasons}): more than "
                f"data.max_bad_fraction={self.max_fraction}; fix the data or raise the limit"
            )


def _epoch_seed(seed: int, epoch: int) -> int:
    return random.Random(f"{seed}-{epoch}-perm").getrandbits(63)


class InMemoryLoader:
    """The small-data fast path: all samples in one uint8 tensor on the device, shuffled there.

    Epoch e: one permutation of all N samples seeded by (seed, e), dealt to ranks round-robin
    and cut to steps * batch_size per rank, steps = N // (world_size * batch_size).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        keys: list[str],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images, self.labels, self.keys = images, labels, np.asarray(keys)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.report = BadSampleReport(1.0)
        if self.steps_in_epoch(0) < 1:
            raise MoeVaeError(
                f"{len(images)} samples over {world_size} rank(s) do not fill one batch of "
                f"{batch_size}: lower train.batch_size"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self.images) // (self.world_size * self.batch_size)

    def epoch_plan(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices of epoch `epoch`, one row per step: [steps, B] (CPU)."""
        B, steps = self.batch_size, self.steps_in_epoch(epoch)
        gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        mine = torch.randperm(len(self.images), generator=gen)[self.rank :: self.world_size]
        return mine[: steps * B].view(steps, B)

    def order(self) -> dict[str, Any]:
        """What fixes each epoch's global batches (saved with the resume position). The
        world size is not part of it: ranks deal the same global batches among themselves."""
        return {
            "loader": "memory",
            "seed": self.seed,
            "global_batch": self.batch_size * self.world_size,
            "samples": len(self.images),
        }

    def epoch_batches(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        plan = self.epoch_plan(epoch)[skip:]
        # One copy of the epoch's indices to the device, not one per step: a copy from
        # pageable host memory may wait for the device even when asked not to block.
        # Keys are looked up by the CPU copy: no device sync.
        for idx, dev_idx in zip(plan, plan.to(self.images.device), strict=True):
            keys = self.keys[idx.numpy()].tolist()
            yield Batch(self.images[dev_idx], self.labels[dev_idx], keys, index=dev_idx)


class StreamingLoader:
    """Batches streamed from shards by DataLoader workers (the pipeline in pipeline.py).

    Steps per epoch: without resampling, planned from the per-shard sample counts so that every
    rank stops after the same number of batches (the smallest rank's full batches); with
    resampling, `epoch_steps` (default: one pass over the data's size). A rank whose bad samples
    leave it short of the plan, in one process as in many, refills the missing steps from its
    epoch's start (epoch_batches).
    """

    def __init__(
        self,
        shards: ShardSet,
        image_shape: tuple[int, int, int],
        batch_size: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 10_000,
        resampled: bool = False,
        epoch_steps: int | None = None,
        max_bad_fraction: float = 0.01,
        pin_memory: bool = False,
    ) -> None:
        if not resampled and shards.counts is None:
            raise ShardError(
                "remote shards without a manifest have no known size: set data.resampled=true "
                "(and data.epoch_steps), or use local shards, or serve the <name>.manifest.json "
                "`moe-vae data write` wrote beside http(s) shards"
            )
        if not resampled and len(shards.urls) < world_size:
            raise ShardError(
                f"{len(shards.urls)} shards cannot be split over {world_size} ranks: write more, "
                f"smaller shards or set data.resampled=true"
            )
        self.shards, self.image_shape = shards, image_shape
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers, self.resampled, self.pin_memory = num_workers, resampled, pin_memory
        self.epoch_steps = epoch_steps
        self.report = BadSampleReport(max_bad_fraction)
        self.dataset = ShardStream(
            StreamSpec(
                shards.urls,
                image_shape,
                batch_size,
                seed,
                rank,
                world_size,
                shuffle_buffer,
                resampled,
                shards.counts,
            )
        )
        if self.steps_in_epoch(0) < 1:
            raise MoeVaeError(
                f"the shards do not give every rank one full batch of {batch_size} per epoch: "
                f"lower train.batch_size or data.num_workers"
            )

    def order(self) -> dict[str, Any]:
        """What fixes each epoch's batches on every rank (saved with the resume position): the
        shards are split over ranks and workers, so those counts are part of it."""
        return {
            "loader": "stream",
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "shuffle_buffer": self.dataset.spec.shuffle_buffer,
            "resampled": self.resampled,
            "epoch_steps": self.epoch_steps,
            "shards": hashlib.sha256("\n".join(self.shards.urls).encode()).hexdigest()[:16],
        }

    def steps_in_epoch(self, epoch: int) -> int:
        if self.resampled:
            if self.epoch_steps:
                return self.epoch_steps
            total = self.shards.num_samples
            if total is None:
                raise ShardError(
                    "data.resampled with shards of unknown size needs data.epoch_steps"
                )
            return total // (self.world_size * self.batch_size)
        assert self.shards.counts is not None
        count = dict(zip(self.shards.urls, self.shards.counts, strict=True))
        order = epoch_shard_order(self.shards.urls, self.seed, epoch)
        workers = max(self.num_workers, 1)
        per_rank = [
            sum(
                sum(count[u] for u in split_shards(order, r, self.world_size, w, workers))
                // self.batch_size
                for w in range(workers)
            )
            for r in range(self.world_size)
        ]
        return min(per_rank)

    def epoch_batches(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """The epoch's batches after the first `skip` (read and dropped: exact, not free).

        `report` counts from the epoch's start, the skipped batches included (their bad samples
        are in the workers' counts too): a resumed epoch is held to the same ceiling, and logs
        the same counts, as the uninterrupted one.

        Refill: skipped bad samples can leave this rank's stream short of the planned steps.
        Rather than stop (the other ranks would wait for it in a collective) or agree on a
        shorter epoch (a collective per step), it reads its epoch stream again from the start
        and takes the missing batches from there: the same batches in the same order each time,
        so a resumed run that skips batches meets exactly the same ones. One process does the
        same, so every epoch runs its planned steps. Refilled steps are counted in
        `report.refilled_steps`; the repeated pass's bad samples are not counted again. A pass
        that gives no batch at all stops the run.
        """
        # Reset here, not at the end: a generator the trainer leaves early never reaches its end.
        self.report.reset()
        steps = self.steps_in_epoch(epoch)
        done = 0
        for repeat in itertools.count():
            before = done
            with contextlib.closing(self._pass(epoch, counted=not repeat)) as batches:
                for batch in batches:
                    done += 1
                    if repeat:
                        self.report.refilled_steps += 1
                    if done > skip:
                        yield batch
                    if done >= steps:
                        break  # before reading on: the next batch would count as used
            if not repeat:
                self.report.check(final=True)
            if done >= steps:
                return
            if done == before:
                raise BadDataError(
                    f"rank {self.rank} ran out of data after {done} of {steps} planned steps in "
                    f"epoch {epoch}: a whole pass over its shards gave no full batch of "
                    f"{self.batch_size} (bad samples: {dict(self.report.counts)}); fix the shards"
                )

    def _pass(self, epoch: int, counted: bool) -> Generator[Batch, None, None]:
        """One pass over this rank's stream of epoch `epoch`; `counted`: its samples, good and
        bad, go to `report` (the first pass; a refill pass repeats them)."""
        self.dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=4 if self.num_workers else None,
            # Its own generator: creating the iterator must not draw from the global RNG, or a
            # resumed run's noise would differ from the uninterrupted run's.
            generator=torch.Generator(),
            worker_init_fn=_leave_signals_to_the_trainer,
        )
        latest: dict[int, dict[str, int]] = {}
        for item in loader:
            if item.error:
                raise ShardError(item.error)
            if counted:
                latest[item.worker] = item.bad
                self._update_counts(latest)
            for batch in split_batch(item, self.batch_size):
                if counted:
                    self.report.good += self.batch_size
                    self.report.check()
                yield batch

    def _update_counts(self, latest: dict[int, dict[str, int]]) -> None:
        # Each worker's counts are cumulative over the epoch: the latest of each, summed.
        self.report.counts = Counter()
        for counts in latest.values():
            self.report.counts.update(counts)


def _leave_signals_to_the_trainer(worker_id: int) -> None:
    """A scheduler signals every process of the job (SLURM's --signal, a kill of the process
    group): a worker that died of it would make the DataLoader raise in the trainer while it
    writes its pre-emption checkpoint. Workers ignore SIGTERM/SIGINT; the trainer stops them
    when it is done (and they exit on their own if it dies)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def load_in_memory(
    shards: ShardSet,
    image_shape: tuple[int, int, int] | None,
    limit: int | None,
    max_bad_fraction: float,
) -> tuple[torch.Tensor, torch.Tensor, list[str], Counter[str]]:
    """Read shards in order (no shuffle) into uint8 [N, C, H, W], labels [N], keys."""
    counter = BadSampleCounter()
    expected = dict(zip(shards.urls, shards.counts, strict=True)) if shards.counts else None
    chunks, n = [], 0
    for chunk in read_shards(shards.urls, RecordDecoder(image_shape, counter), counter, expected):
        chunks.append(chunk)
        n += len(chunk)
        if limit and n >= limit:
            break
    report = BadSampleReport(max_bad_fraction)
    report.counts, report.good = counter.counts, n
    report.check(final=True)
    if not chunks:
        raise ShardError(f"no usable samples in the shards starting at {shards.urls[0]!r}")
    images = np.concatenate([c.images for c in chunks])[:limit]
    labels = np.concatenate([c.labels for c in chunks])[:limit]
    keys = [str(k) for c in chunks for k in c.keys][:limit]
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), keys, counter.counts


def memory_samples(shards: ShardSet, sample_limit: int | None = None) -> int | None:
    """How many samples load_in_memory would hold: all, or only the first `sample_limit` (then
    known even for shards of unknown size)."""
    n = shards.num_samples
    if sample_limit is None:
        return n
    return sample_limit if n is None else min(n, sample_limit)


def fits_in_memory(
    shards: ShardSet,
    image_shape: tuple[int, int, int],
    limit_mb: int,
    sample_limit: int | None = None,
) -> bool:
    n = memory_samples(shards, sample_limit)
    return n is not None and n * math.prod(image_shape) <= limit_mb * 2**20


def loader_state(epoch: int, batches_done: int, order: dict[str, Any]) -> dict[str, Any]:
    """The stream position saved with a checkpoint: resume = epoch_batches(epoch, batches_done),
    exact where the loader's `order()` is the same then."""
    return {"epoch": epoch, "batches_done": batches_done, "order": order}


def order_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between a saved and the current `order()`: `key saved -> now` each."""
    return [
        f"{key} {saved.get(key)!r} -> {now.get(key)!r}"
        for key in sorted(set(saved) | set(now))
        if saved.get(key) != now.get(key)
    ]
