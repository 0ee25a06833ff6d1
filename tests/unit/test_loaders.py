"""Loader guarantees: partitions across ranks and workers, determinism, exact resume, bad data."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from shard_helpers import key_index, write_tiny

from moe_vae.data.loaders import BadDataError, InMemoryLoader, StreamingLoader, load_in_memory
from moe_vae.data.records import npy_bytes
from moe_vae.data.shardlist import resolve

SHAPE = (1, 6, 5)


def _stream(shards, rank=0, world=1, workers=2, batch=10, seed=3, **kw):
    return StreamingLoader(
        shards,
        SHAPE,
        batch,
        seed,
        rank=rank,
        world_size=world,
        num_workers=workers,
        shuffle_buffer=64,
        **kw,
    )


def _keys(loader, epoch, skip=0):
    return [k for b in loader.epoch_batches(epoch, skip) for k in b.keys]


@pytest.mark.parametrize("world", [2, 4])
def test_streaming_split_is_a_partition(tmp_path, world):
    pattern, _, _ = write_tiny(tmp_path, n=400, per_shard=50)  # 8 shards of 50
    shards = resolve(pattern)
    per_rank = [_keys(_stream(shards, rank=r, world=world), epoch=1) for r in range(world)]
    steps = {len(k) // 10 for k in per_rank}
    assert len(steps) == 1, "every rank must run the same number of steps"
    flat = [k for keys in per_rank for k in keys]
    assert len(flat) == len(set(flat)) == 400  # union = all, no overlap


def test_equal_steps_when_shards_are_uneven(tmp_path):
    pattern, _, _ = write_tiny(tmp_path, n=370, per_shard=50)  # 7 x 50 + 20
    shards = resolve(pattern)
    loaders = [_stream(shards, rank=r, world=3, workers=2) for r in range(3)]
    for epoch in (1, 2):
        planned = {ld.steps_in_epoch(epoch) for ld in loaders}
        assert len(planned) == 1
        got = [len(_keys(ld, epoch)) // 10 for ld in loaders]
        assert got == [planned.pop()] * 3
        flat = [k for ld in loaders for k in _keys(ld, epoch)]
        assert len(flat) == len(set(flat))


def test_streaming_is_deterministic_and_epochs_differ(tmp_path):
    pattern, _, _ = write_tiny(tmp_path, n=200, per_shard=25)
    shards = resolve(pattern)
    a, b = _keys(_stream(shards), 1), _keys(_stream(shards), 1)
    assert a == b
    assert _keys(_stream(shards), 2) != a
    assert _keys(_stream(shards, seed=4), 1) != a
    assert sorted(map(key_index, a)) == list(range(200))


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_resume_continues_exactly(tmp_path, workers):
    pattern, _, _ = write_tiny(tmp_path, n=300, per_shard=40)
    shards = resolve(pattern)
    full = _keys(_stream(shards, workers=workers), epoch=5)
    for skip in (1, 7, len(full) // 10 - 1):
        resumed = _keys(_stream(shards, workers=workers), epoch=5, skip=skip)
        assert resumed == full[skip * 10 :]


def test_in_memory_partition_determinism_and_resume(tmp_path):
    pattern, _, _ = write_tiny(tmp_path, n=203, per_shard=60)
    images, labels, keys, _ = load_in_memory(resolve(pattern), None, None, 0.0)

    def loader(rank=0, world=1, seed=0):
        return InMemoryLoader(images, labels, keys, 10, seed, rank, world)

    per_rank = [_keys(loader(r, 4), 1) for r in range(4)]
    assert {len(k) for k in per_rank} == {50}  # 203 // (4 * 10) = 5 steps each
    flat = [k for ks in per_rank for k in ks]
    assert len(flat) == len(set(flat))
    full = _keys(loader(), 3)
    assert full == _keys(loader(), 3) and full != _keys(loader(), 4)
    assert _keys(loader(), 3, skip=6) == full[60:]
    batch = next(loader().epoch_batches(0))
    idx = [keys.index(k) for k in batch.keys]
    assert torch.equal(batch.images, images[idx]) and torch.equal(batch.labels, labels[idx])


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_samples_are_skipped_counted_and_good_ones_kept(tmp_path):
    rng = np.random.default_rng(0)
    good = {f"g{i:03d}": rng.integers(0, 256, (6, 5), dtype=np.uint8) for i in range(40)}
    path = tmp_path / "mixed-000000.tar"
    with tarfile.open(path, "w") as tar:
        items = list(good.items())
        for i, (key, image) in enumerate(items[:20]):
            if i % 2:
                _add(tar, f"{key}.npy", npy_bytes(image))
            else:
                _add(tar, f"{key}.png", _png(image))
            _add(tar, f"{key}.cls", b"3")
        _add(tar, "b_missing.cls", b"1")  # a sample missing its image
        _add(tar, "b_undecodable.png", b"\x89PNG not really")
        _add(tar, "b_shape.npy", npy_bytes(np.zeros((7, 5), np.uint8)))
        _add(tar, "b_dtype.npy", npy_bytes(np.zeros((6, 5), np.float32)))
        _add(tar, "b_corrupt.npy", b"garbage bytes")
        for key, image in items[20:]:
            _add(tar, f"{key}.npy", npy_bytes(image))
    # A second shard truncated in the middle of a member: what precedes the cut is kept.
    path2 = tmp_path / "mixed-000001.tar"
    with tarfile.open(path2, "w") as tar:
        for i in range(3):
            _add(tar, f"t{i:03d}.npy", npy_bytes(rng.integers(0, 256, (6, 5), dtype=np.uint8)))
        _add(tar, "t_cut.npy", npy_bytes(np.zeros((6, 5), np.uint8)) * 50)
    raw = path2.read_bytes()
    path2.write_bytes(raw[: 3 * 1024 + 1024 + 700])

    shards = resolve(str(tmp_path / "mixed-{000000..000001}.tar"), count=False)
    images, _, keys, bad = load_in_memory(shards, SHAPE, None, 1.0)
    assert set(good) <= set(keys)  # no good sample lost
    assert {"t000", "t001", "t002"} <= set(keys)
    assert len(keys) == 43
    assert bad["missing_image"] == 1
    assert bad["undecodable"] == 2  # the fake PNG and the garbage .npy
    assert bad["wrong_shape"] == 1 and bad["wrong_dtype"] == 1
    assert bad["tar_error"] >= 1  # the truncated member
    for key, image in good.items():
        assert np.array_equal(images[keys.index(key), 0].numpy(), image)

    # The same counts through the streaming loader, and the ceiling turns them into an error.
    shards.counts = [45, 4]
    loader = StreamingLoader(shards, SHAPE, 5, 0, num_workers=0, max_bad_fraction=1.0)
    assert len(_keys(loader, 0)) >= 35
    assert loader.report.counts["missing_image"] == 1
    strict = StreamingLoader(shards, SHAPE, 5, 0, num_workers=0, max_bad_fraction=0.01)
    with pytest.raises(BadDataError, match=r"samples were bad .*data\.max_bad_fraction=0\.01"):
        _keys(strict, 0)
    with pytest.raises(BadDataError, match="missing_image 1"):
        load_in_memory(shards, SHAPE, None, 0.01)


def test_resampled_stream_runs_the_planned_steps(tmp_path):
    pattern, _, _ = write_tiny(tmp_path, n=100, per_shard=25)
    shards = resolve(pattern)
    loader = _stream(shards, resampled=True, epoch_steps=23)
    assert len(_keys(loader, 0)) == 230
    assert _keys(loader, 0) == _keys(_stream(shards, resampled=True, epoch_steps=23), 0)


def _spoil_last_shard(pattern: str, bad: int) -> None:
    """Rewrites the last of write_tiny's 50-sample shards: 50 - bad good samples, then `bad`
    float32 images (skipped as wrong_dtype). Its manifest still promises 50 samples."""
    path = resolve(pattern).urls[-1]
    rng = np.random.default_rng(5)
    with tarfile.open(path, "w") as tar:
        for i in range(50 - bad):
            _add(tar, f"s{i:03d}.npy", npy_bytes(rng.integers(0, 256, (6, 5), dtype=np.uint8)))
        for i in range(bad):
            _add(tar, f"b{i:03d}.npy", npy_bytes(np.zeros((6, 5), np.float32)))


def test_bad_sample_ceiling_holds_for_each_epoch(tmp_path):
    """Data that goes bad in a later epoch is measured against that epoch, not diluted by the
    good samples of the epochs before it."""
    pattern, _, _ = write_tiny(tmp_path, n=200, per_shard=50)
    loader = _stream(resolve(pattern), workers=0, max_bad_fraction=0.07)
    assert len(_keys(loader, 0)) == 200 and loader.report.bad == 0
    _spoil_last_shard(pattern, bad=20)  # epoch 1: 20 bad of 200 = 10%, over the 7% ceiling
    with pytest.raises(BadDataError, match=r"20 of 200 samples were bad \(wrong_dtype 20\)"):
        _keys(loader, 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_sample_counts_are_per_epoch(tmp_path, workers):
    """loader.report.counts (logged as each epoch's data/bad/*) are the epoch's own counts, a
    resumed epoch's included; the steps refilled are counted apart, never as bad samples."""
    pattern, _, _ = write_tiny(tmp_path, n=200, per_shard=50)
    _spoil_last_shard(pattern, bad=20)  # 180 good samples for 20 planned steps: 2 steps short
    loader = _stream(resolve(pattern), workers=workers, max_bad_fraction=1.0)
    epoch_counts = {"wrong_dtype": 20}
    for epoch in (0, 1, 2):
        keys = _keys(loader, epoch)
        assert len(keys) == 200 and keys[180:] == keys[:20]  # refilled from the epoch's start
        assert loader.report.counts == epoch_counts and loader.report.bad == 20
        assert loader.report.good == 180 and loader.report.refilled_steps == 2
    assert len(_keys(loader, 3, skip=5)) == 150
    assert loader.report.counts == epoch_counts and loader.report.good == 180


@pytest.mark.parametrize("workers", [0, 2])
def test_a_rank_short_of_its_plan_refills_from_its_epoch_start(tmp_path, workers):
    """One bad sample of 400 leaves one of two ranks a batch short: it repeats its epoch's first
    batch instead of stopping the job ("rank 1 ran out of data"), and a resumed run that skips
    into the refilled steps meets the same batches."""
    pattern, _, _ = write_tiny(tmp_path, n=400, per_shard=50)
    _spoil_last_shard(pattern, bad=1)
    shards = resolve(pattern)
    loaders = [_stream(shards, rank=r, world=2, workers=workers) for r in range(2)]
    assert {ld.steps_in_epoch(1) for ld in loaders} == {20}
    per_rank = [_keys(ld, 1) for ld in loaders]
    assert [len(k) for k in per_rank] == [200, 200]
    assert sorted(ld.report.refilled_steps for ld in loaders) == [0, 1]
    short = next(r for r, ld in enumerate(loaders) if ld.report.refilled_steps)
    keys = per_rank[short]
    assert keys[190:] == keys[:10] and len(set(keys)) == 190
    assert loaders[short].report.counts == {"wrong_dtype": 1}  # not counted twice
    assert _keys(_stream(shards, rank=short, world=2, workers=workers), 1, skip=19) == keys[190:]


def test_a_pass_with_no_batch_is_one_error(tmp_path):
    pattern, _, _ = write_tiny(tmp_path, n=50, per_shard=50)
    _spoil_last_shard(pattern, bad=45)  # 5 good samples: no batch of 10
    loader = _stream(resolve(pattern), workers=0, max_bad_fraction=1.0)
    with pytest.raises(
        BadDataError,
        match=r"rank 0 ran out of data after 0 of 5 planned steps in epoch 0: a whole pass over "
        r"its shards gave no full batch of 10 \(bad samples: \{'wrong_dtype': 45\}\)",
    ):
        _keys(loader, 0)


def test_train_limit_counts_against_the_memory_limit_or_is_refused(tmp_path):
    """data.loader=auto holds the first data.train_limit samples in memory when they fit, even
    when all the data would not; when they do not fit either, one error, not an ignored limit."""
    from moe_vae.config.schema import DataConfig
    from moe_vae.data.build import build_data
    from moe_vae.data.loaders import fits_in_memory
    from moe_vae.data.shardlist import ShardSet
    from moe_vae.errors import MoeVaeError

    # 300 images of 64 x 64: 1.17 MiB in all, over a 1 MiB limit; 100 of them fit.
    pattern, images, _ = write_tiny(tmp_path, n=300, per_shard=100, shape=(64, 64))

    def data(**kw):
        cfg = DataConfig(name="shards", train_shards=pattern, memory_limit_mb=1, **kw)
        return build_data(cfg, batch_size=10, seed=0, device=torch.device("cpu"), progress=False)

    assert isinstance(data().train, StreamingLoader)
    limited = data(train_limit=100).train
    assert isinstance(limited, InMemoryLoader) and len(limited.images) == 100
    assert torch.equal(limited.images[:, 0], torch.from_numpy(images[:100]))
    with pytest.raises(
        MoeVaeError,
        match=r"data\.train_limit=290 needs the in-memory loader, but data\.loader=auto streams "
        r"these shards: 290 samples .*data\.memory_limit_mb=1",
    ):
        data(train_limit=290)
    # Shards of unknown size: the limit alone bounds what is held.
    unknown = ShardSet(["remote-shard.tar"], None, None)
    assert not fits_in_memory(unknown, (1, 64, 64), 1)
    assert fits_in_memory(unknown, (1, 64, 64), 1, sample_limit=100)


def test_a_truncated_shard_counts_the_samples_it_lost(tmp_path):
    """The manifest promised 100 samples in the cut shard: the ones it did not yield are bad
    samples (webdataset reports the cut as one error), so 15% of the data gone trips the
    ceiling of a streamed epoch and of the in-memory load."""
    pattern, _, _ = write_tiny(tmp_path, n=400, per_shard=100, record_size=10)
    shards = resolve(pattern)
    cut = Path(shards.urls[2])
    cut.write_bytes(cut.read_bytes()[: int(cut.stat().st_size * 0.3)])
    _, _, keys, bad = load_in_memory(shards, SHAPE, None, 1.0)
    assert 300 < len(keys) <= 345 and bad["tar_error"] == 1
    assert bad["tar_error"] + bad["missing_samples"] == 400 - len(keys)
    with pytest.raises(BadDataError, match=r"missing_samples \d+.*max_bad_fraction=0\.05"):
        load_in_memory(shards, SHAPE, None, 0.05)
    loader = _stream(shards, workers=2, max_bad_fraction=0.05)
    with pytest.raises(BadDataError, match=r"samples were bad \(missing_samples \d+, tar_error"):
        _keys(loader, 0)
