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
