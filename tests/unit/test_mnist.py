"""MNIST IDX reading: the embedded copy, user directories, checked downloads, corrupt files."""

import gzip
import http.server
import shutil
import struct
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from moe_vae.config.schema import DataConfig
from moe_vae.data.mnist import EMBEDDED_DIR, MNIST_FILES, DataError, load_mnist, read_idx

TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_embedded_copy_is_complete_and_checked():
    train, test = load_mnist(DataConfig())
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert test.images.shape == (10000, 28, 28)
    assert np.bincount(train.labels).tolist() == TRAIN_LABEL_COUNTS
    assert len(test.labels) == 10000


def test_limits_take_the_first_samples():
    train, test = load_mnist(DataConfig(train_limit=123, test_limit=45))
    full_train, _ = load_mnist(DataConfig())
    assert len(train.images) == 123 and len(test.labels) == 45
    assert np.array_equal(train.images, full_train.images[:123])


def _small_labels_file(path: Path, labels: list[int]) -> Path:
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">II", 2049, len(labels)) + bytes(labels))
    return path


def test_reader_parses_a_hand_made_file(tmp_path):
    arr = read_idx(_small_labels_file(tmp_path / "l.gz", [3, 1, 4]))
    assert arr.tolist() == [3, 1, 4]


def test_md5_mismatch_is_an_error_naming_the_file(tmp_path):
    name = "t10k-labels-idx1-ubyte.gz"
    bad = tmp_path / name
    data = bytearray((EMBEDDED_DIR / name).read_bytes())
    data[-20] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(
        DataError, match=rf"{name}' is corrupt: md5 \w+, expected {MNIST_FILES[name]}"
    ):
        read_idx(bad, MNIST_FILES[name])


def test_truncated_gzip_is_an_error(tmp_path):
    name = "t10k-images-idx3-ubyte.gz"
    cut = tmp_path / name
    cut.write_bytes((EMBEDDED_DIR / name).read_bytes()[:50_000])
    with pytest.raises(DataError, match="not a readable gzip file"):
        read_idx(cut)  # even without an md5 to compare, the stream itself is checked


def test_truncated_payload_is_an_error(tmp_path):
    raw = tmp_path / "imgs"
    raw.write_bytes(struct.pack(">IIII", 2051, 10, 28, 28) + bytes(100))
    with pytest.raises(
        DataError, match=r"truncated or padded: 100 data bytes, header \[10, 28, 28\]"
    ):
        read_idx(raw)


def test_wrong_magic_and_tiny_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(struct.pack(">II", 1234, 0))
    with pytest.raises(DataError, match="magic 1234, expected 2051"):
        read_idx(bad)
    bad.write_bytes(b"abc")
    with pytest.raises(DataError, match="truncated: 3 bytes"):
        read_idx(bad)


def test_user_directory_with_raw_and_gz_files(tmp_path):
    for name in MNIST_FILES:
        if "t10k" in name:  # decompressed copies, checked structurally
            with gzip.open(EMBEDDED_DIR / name) as f:
                (tmp_path / name.removesuffix(".gz")).write_bytes(f.read())
        else:
            shutil.copy(EMBEDDED_DIR / name, tmp_path / name)
    train, test = load_mnist(DataConfig(source="dir", root=str(tmp_path)))
    assert len(train.labels) == 60000 and len(test.labels) == 10000
    _, ref_test = load_mnist(DataConfig())
    assert np.array_equal(test.images, ref_test.images)


def test_user_directory_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"'train-images-idx3-ubyte\.gz' not found in"):
        load_mnist(DataConfig(source="dir", root=str(tmp_path)))
    with pytest.raises(DataError, match="is not a directory"):
        load_mnist(DataConfig(source="dir", root=str(tmp_path / "nope")))


@pytest.fixture
def mirror(tmp_path):
    """A real HTTP server on loopback serving a copy of the MNIST files (and a corrupt one)."""
    good = tmp_path / "mirror" / "good"
    bad = tmp_path / "mirror" / "bad"
    good.mkdir(parents=True)
    bad.mkdir(parents=True)
    for name in MNIST_FILES:
        shutil.copy(EMBEDDED_DIR / name, good / name)
        (bad / name).write_bytes(b"not the file")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "mirror"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_tries_mirrors_and_checks_md5(tmp_path, mirror):
    root = tmp_path / "cache"
    cfg = DataConfig(
        source="download",
        root=str(root),
        mirrors=[f"{mirror}/missing/", f"{mirror}/bad/", f"{mirror}/good/"],
    )
    train, test = load_mnist(cfg)
    assert len(train.labels) == 60000 and len(test.labels) == 10000
    assert sorted(p.name for p in root.iterdir()) == sorted(MNIST_FILES)  # no temp files left


def test_download_with_only_bad_mirrors_fails_and_leaves_nothing(tmp_path, mirror):
    root = tmp_path / "cache"
    cfg = DataConfig(source="download", root=str(root), mirrors=[f"{mirror}/bad/"])
    with pytest.raises(DataError, match=r"could not download train-images-idx3-ubyte.gz: .*md5"):
        load_mnist(cfg)
    assert list(root.iterdir()) == []


def test_download_root_that_cannot_be_made_is_one_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    cfg = DataConfig(source="download", root=str(tmp_path / "afile" / "mnist"), mirrors=["x"])
    with pytest.raises(DataError, match=r"data.root '.*afile/mnist': cannot create it"):
        load_mnist(cfg)


# The shard cache: keyed by the IDX files' content, safe to fill from several processes at once.


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 2051 if array.ndim == 3 else 2049
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _idx_dir(root: Path, seed: int, n_train: int = 60, n_test: int = 20) -> dict[str, np.ndarray]:
    """Four small IDX files (not MNIST) under MNIST's names; returns the arrays written."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{prefix}-images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{prefix}-labels"] = rng.integers(0, 10, n, dtype=np.uint8)
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", arrays[f"{prefix}-images"])
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", arrays[f"{prefix}-labels"])
    return arrays


def _read_back(pattern: str) -> tuple[np.ndarray, np.ndarray]:
    from moe_vae.data.loaders import load_in_memory
    from moe_vae.data.shardlist import resolve

    images, labels, _, _ = load_in_memory(resolve(pattern), None, None, 0.0)
    return images.numpy()[:, 0], labels.numpy()


def test_shard_cache_is_keyed_by_the_idx_files_content(tmp_path):
    from moe_vae.data.build import ensure_mnist_shards

    def cfg(root: Path) -> DataConfig:
        return DataConfig(
            source="dir", root=str(root), verify_md5=False, cache_dir=str(tmp_path / "cache")
        )

    a, b = _idx_dir(tmp_path / "a", seed=1), _idx_dir(tmp_path / "b", seed=2)
    train_a, test_a = ensure_mnist_shards(cfg(tmp_path / "a"), progress=False)
    train_b, test_b = ensure_mnist_shards(cfg(tmp_path / "b"), progress=False)
    assert train_a != train_b and test_a != test_b
    for arrays, train, test in ((a, train_a, test_a), (b, train_b, test_b)):
        images, labels = _read_back(train)
        assert np.array_equal(images, arrays["train-images"])
        assert np.array_equal(labels, arrays["train-labels"])
        assert np.array_equal(_read_back(test)[0], arrays["t10k-images"])
    # Other bytes under the same root (the dataset replaced in place) get shards of their own.
    c = _idx_dir(tmp_path / "a", seed=3)
    train_c, _ = ensure_mnist_shards(cfg(tmp_path / "a"), progress=False)
    assert train_c != train_a
    assert np.array_equal(_read_back(train_c)[0], c["train-images"])


def test_official_files_keep_the_stable_cache_name(tmp_path):
    """The embedded copy, and the same files anywhere else, share the cache under its old name."""
    from moe_vae.data.build import mnist_cache_dir

    for name in MNIST_FILES:
        shutil.copy(EMBEDDED_DIR / name, tmp_path / name)
    stable = mnist_cache_dir(DataConfig()).name
    assert stable == "mnist-batched-10000"
    assert mnist_cache_dir(DataConfig(source="dir", root=str(tmp_path))).name == stable
    assert mnist_cache_dir(DataConfig(record="sample")).name == "mnist-sample-10000"
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(10_000, np.uint8))
    other = mnist_cache_dir(DataConfig(source="dir", root=str(tmp_path), verify_md5=False))
    assert other.name.startswith("mnist-batched-10000-") and other.name != stable


def _fill_cache(cfg: DataConfig, barrier, results, no_locks: bool) -> None:
    """One of several processes filling one empty shard cache at the same moment."""
    import traceback

    try:
        if no_locks:  # a file system that refuses locks: the writers then really race
            import fcntl

            def refuse(*args, **kwargs):
                raise OSError(37, "No locks available")

            fcntl.flock = refuse
        from moe_vae.data.build import ensure_mnist_shards

        barrier.wait()
        results.put(("ok", ensure_mnist_shards(cfg, progress=False)))
    except BaseException:
        results.put(("error", traceback.format_exc()))


@pytest.mark.parametrize("no_locks", [False, True])
def test_concurrent_writers_of_one_cache_all_succeed(tmp_path, no_locks):
    """The local ranks of a node with a node-local cache all call ensure_mnist_shards at once."""
    import multiprocessing as mp

    from moe_vae.data.build import _complete
    from moe_vae.data.writer import manifest_path

    arrays = _idx_dir(tmp_path / "idx", seed=4, n_train=3000, n_test=300)
    cfg = DataConfig(
        source="dir",
        root=str(tmp_path / "idx"),
        verify_md5=False,
        cache_dir=str(tmp_path / "cache"),
        samples_per_shard=10,  # many small shards: many chances for the writers to collide
    )
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [
        ctx.Process(target=_fill_cache, args=(cfg, barrier, results, no_locks)) for _ in range(3)
    ]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    errors = [detail for status, detail in got if status != "ok"]
    assert not errors, errors[0]
    assert len({tuple(patterns) for _, patterns in got}) == 1
    train, test = got[0][1]
    out = Path(train).parent
    for split in ("train", "test"):
        assert _complete(manifest_path(out, split)) is not None  # every shard matches its sha256
    images, labels = _read_back(train)
    assert np.array_equal(images, arrays["train-images"])
    assert np.array_equal(labels, arrays["train-labels"])
    assert np.array_equal(_read_back(test)[0], arrays["t10k-images"])
    assert not list(out.glob("*.tmp")), "temporary files left behind"
