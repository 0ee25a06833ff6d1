"""Shard writing and reading: round trips, other writers' shards, URLs, shard-list errors."""

from __future__ import annotations

import http.server
import io
import json
import tarfile
import threading
from functools import partial

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from shard_helpers import key_index, tiny_arrays, write_tiny

from moe_vae.data.loaders import BadDataError, StreamingLoader, load_in_memory
from moe_vae.data.mnist import DataError
from moe_vae.data.records import npy_bytes
from moe_vae.data.shardlist import ShardError, expand, preflight, resolve
from moe_vae.data.sources import array_source, image_folder_source, mnist_source
from moe_vae.data.writer import WriteOptions, write_shards
from moe_vae.errors import MoeVaeError


@pytest.mark.parametrize("record", ["batched", "sample"])
def test_round_trip_with_labels(tmp_path, record):
    pattern, images, labels = write_tiny(tmp_path, n=130, per_shard=50, record=record)
    shards = resolve(pattern)
    assert shards.urls == [str(tmp_path / f"train-{i:06d}.tar") for i in range(3)]
    assert shards.counts == [50, 50, 30] and shards.image_shape == (1, 6, 5)
    got, got_labels, keys, bad = load_in_memory(shards, None, None, 0.0)
    assert not bad
    order = [key_index(k) for k in keys]
    assert order == list(range(130))
    assert np.array_equal(got.numpy()[:, 0], images)
    assert np.array_equal(got_labels.numpy(), labels)


def test_manifest_and_identical_rewrites(tmp_path):
    write_tiny(tmp_path / "a", n=60, per_shard=25)
    write_tiny(tmp_path / "b", n=60, per_shard=25)
    ma = json.loads((tmp_path / "a" / "train.manifest.json").read_text())
    mb = json.loads((tmp_path / "b" / "train.manifest.json").read_text())
    assert ma["num_samples"] == 60 and ma["image_shape"] == [6, 5] and ma["dtype"] == "uint8"
    assert [s["samples"] for s in ma["shards"]] == [25, 25, 10]
    assert ma["shards"] == mb["shards"]  # same input -> byte-identical shards (same sha256)


def test_sources_npz_npy_and_image_folder(tmp_path):
    images, labels = tiny_arrays(7, shape=(4, 4))
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    src = array_source(tmp_path / "d.npz")
    got = list(src.samples)
    assert [s.label for s in got] == labels.tolist()
    np.save(tmp_path / "d.npy", images)
    assert [s.label for s in array_source(tmp_path / "d.npy").samples] == [-1] * 7

    rgb = np.random.default_rng(1).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    for name in ("cat", "dog"):
        (tmp_path / "img" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rgb[i]).save(tmp_path / "img" / name / f"{i}.png")
    folder = image_folder_source(tmp_path / "img")
    assert folder.class_names == ["cat", "dog"] and folder.num_samples == 6
    manifest = write_shards(folder, tmp_path / "out", "img", WriteOptions(4), progress=False)
    got_images, got_labels, _, _ = load_in_memory(
        resolve(str(tmp_path / "out" / manifest["pattern"])), None, None, 0
    )
    assert got_images.shape == (6, 3, 4, 4)  # HWC on disk -> CHW
    assert got_labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(got_images[0].permute(1, 2, 0).numpy(), rgb[0])


def test_source_errors_name_the_culprit(tmp_path):
    np.savez(tmp_path / "bad.npz", pixels=np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(MoeVaeError, match="expected one named 'images'"):
        array_source(tmp_path / "bad.npz")
    np.save(tmp_path / "f.npy", np.zeros((2, 3, 3), np.float32))
    with pytest.raises(MoeVaeError, match="must be uint8"):
        array_source(tmp_path / "f.npy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoeVaeError, match=r"holds no \.png"):
        image_folder_source(tmp_path / "empty")


def test_shard_directory_that_cannot_be_made_is_one_error(tmp_path):
    """A file where the directory (or one of its parents) should be: one line naming it."""
    (tmp_path / "afile").write_text("keep me")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(MoeVaeError, match=f"shard directory '{out}': cannot create it"):
            write_tiny(out, n=10, per_shard=5)
    assert (tmp_path / "afile").read_text() == "keep me"


def test_mnist_source_writes_real_digits(tmp_path):
    from moe_vae.data.mnist import EMBEDDED_DIR, load_split

    src = mnist_source(EMBEDDED_DIR, "test")
    manifest = write_shards(src, tmp_path, "test", WriteOptions(4000), progress=False)
    assert manifest["num_samples"] == 10_000 and len(manifest["shards"]) == 3
    images, labels, _, _ = load_in_memory(
        resolve(str(tmp_path / manifest["pattern"])), None, None, 0
    )
    ref = load_split(EMBEDDED_DIR, "test")
    assert np.array_equal(images.numpy()[:, 0], ref.images)
    assert np.array_equal(labels.numpy(), ref.labels)


def test_standard_webdataset_shards_from_its_own_writer(tmp_path):
    """Shards made by webdataset's ShardWriter (.png / .npy + .cls) are read too."""
    images, labels = tiny_arrays(12, shape=(5, 5))
    with wds.ShardWriter(str(tmp_path / "std-%06d.tar"), maxcount=5, verbose=0) as sink:
        for i in range(12):
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, format="PNG")
            ext = "png" if i % 2 else "npy"
            value = buf.getvalue() if ext == "png" else images[i]
            sink.write({"__key__": f"s{i:04d}", ext: value, "cls": int(labels[i])})
    shards = resolve(str(tmp_path / "std-{000000..000002}.tar"))
    assert shards.counts == [5, 5, 2]  # no manifest: counted by reading
    assert preflight(shards) == (1, 5, 5)
    got, got_labels, keys, bad = load_in_memory(shards, None, None, 0.0)
    assert not bad and keys == [f"s{i:04d}" for i in range(12)]
    assert np.array_equal(got.numpy()[:, 0], images)
    assert got_labels.tolist() == labels.tolist()


def test_brace_expansion_and_lists():
    assert expand("d/t-{000..002}.tar") == ["d/t-000.tar", "d/t-001.tar", "d/t-002.tar"]
    assert expand(["a-{0..1}.tar", "b.tar"]) == ["a-0.tar", "a-1.tar", "b.tar"]


def test_shard_list_errors(tmp_path):
    with pytest.raises(ShardError, match="matches nothing"):
        resolve(str(tmp_path / "none-{0..3}.tar"))
    pattern, _, _ = write_tiny(tmp_path, n=100, per_shard=50)
    with pytest.raises(ShardError, match="1 of 3 shards missing"):
        resolve(str(tmp_path / "train-{000000..000002}.tar"))
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file at all" * 100)
    junk = resolve([str(tmp_path / "junk.tar"), *expand(pattern)], count=False)
    with pytest.raises(ShardError, match=r"first shard '.*junk\.tar' has no usable sample"):
        preflight(junk)


@pytest.fixture
def http_root(tmp_path):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_and_pipe_urls(http_root):
    root, base = http_root
    _, images, _ = write_tiny(root, n=100, per_shard=50)
    for spec in (
        f"{base}/train-{{000000..000001}}.tar",
        f"pipe:cat {root}/train-{{000000..000001}}.tar",
    ):
        shards = resolve(spec)
        # http: the writer's manifest fetched from beside the shards; pipe: size unknown
        assert shards.counts == ([50, 50] if spec.startswith("http") else None)
        got, _, _, _ = load_in_memory(shards, (1, 6, 5), None, 0.0)
        assert np.array_equal(got.numpy()[:, 0], images)


def test_remote_manifest_missing_or_broken(http_root):
    root, base = http_root
    write_tiny(root, n=100, per_shard=50)
    spec = f"{base}/train-{{000000..000001}}.tar"
    manifest = root / "train.manifest.json"
    good = manifest.read_text()
    manifest.write_text("{not json")
    with pytest.raises(ShardError, match=r"manifest 'http://.*/train\.manifest\.json' could not"):
        resolve(spec)
    manifest.write_text(good)
    manifest.rename(root / "elsewhere.json")  # no manifest: size unknown (needs resampling)
    assert resolve(spec).counts is None


def test_a_first_shard_the_server_refuses_names_its_status(http_root):
    """curl runs silent, so an http shard that cannot be fetched reads as an empty tar; the
    error says what the server said instead of the tar reader's "empty file"."""
    root, base = http_root
    write_tiny(root, n=100, per_shard=50)
    (root / "train-000000.tar").unlink()
    with pytest.raises(
        ShardError, match=r"^first shard '.*/train-000000\.tar' could not be fetched: HTTP 404 "
    ):
        preflight(resolve(f"{base}/train-{{000000..000001}}.tar"))


def test_undecodable_first_image_of_a_folder_is_one_error(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "0.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"image '.*0\.png' cannot be decoded: .*expected a PNG"):
        image_folder_source(tmp_path / "img")


def test_unreadable_npz_is_one_error(tmp_path):
    np.savez(tmp_path / "obj.npz", images=np.array([np.zeros(2), None], dtype=object))
    with pytest.raises(
        DataError,
        match=r"array 'images' in '.*obj\.npz' cannot be read: .*expected a plain numeric array",
    ):
        array_source(tmp_path / "obj.npz")  # an object array: reading it would unpickle
    (tmp_path / "zip.npz").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(DataError, match=r"array file '.*zip\.npz' is not a readable \.npy/\.npz"):
        array_source(tmp_path / "zip.npz")


@pytest.mark.parametrize("keys", [b"[not json", b'{"a": 1}', b"\xff\xfe"])
def test_corrupt_key_list_while_counting_is_one_error(tmp_path, keys):
    """A batched shard without a manifest is counted by reading its key lists."""
    path = tmp_path / "s.tar"
    with wds.TarWriter(str(path), encoder=False) as writer:
        writer.write({"__key__": "r0", "images.npy": b"", "keys.json": keys})
    with pytest.raises(
        ShardError,
        match=r"shard '.*s\.tar': record 'r0' has a corrupt keys\.json .*expected a JSON list",
    ):
        resolve(str(path))


@pytest.mark.parametrize(
    ("member", "data"),
    [("keys.json", b"5"), ("keys.json", b'{"a": 1}'), ("labels.npy", "0-d")],
)
def test_a_batched_record_of_the_wrong_form_is_undecodable(tmp_path, member, data):
    """Members that parse but hold the wrong thing (a number for the key list, a 0-d label
    array) make the record undecodable, counted by the samples it held: no TypeError."""
    images, labels = tiny_arrays(4)
    good = {
        "images.npy": npy_bytes(images),
        "labels.npy": npy_bytes(labels.astype(np.int64)),
        "keys.json": json.dumps([f"k{i}" for i in range(4)]).encode(),
    }
    if data == "0-d":
        buf = io.BytesIO()
        np.save(buf, np.array(7))  # not npy_bytes: ascontiguousarray makes it 1-d
        data = buf.getvalue()
    path = tmp_path / "s-000000.tar"
    with wds.TarWriter(str(path), encoder=False) as writer:
        writer.write({"__key__": "bad", **good, member: data})
        writer.write({"__key__": "good", **good})
    _, _, keys, bad = load_in_memory(resolve(str(path), count=False), None, None, 1.0)
    assert len(keys) == 4 and bad == {"undecodable": 4}


def _garble_member(path: str, suffix: str) -> None:
    """Overwrites the first member whose name ends in `suffix` with as many bytes of junk."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(path, "w") as tar:
        garbled = False
        for info, data in members:
            if not garbled and info.name.endswith(suffix):
                data, garbled = b"X" * len(data), True
            tar.addfile(info, io.BytesIO(data))


def test_a_lost_batched_record_counts_every_sample_it_held(tmp_path):
    pattern, _, _ = write_tiny(tmp_path, n=200, per_shard=50, record_size=16)
    shards = resolve(pattern)
    _garble_member(shards.urls[0], ".images.npy")  # the first record: 16 samples
    _, _, keys, bad = load_in_memory(shards, (1, 6, 5), None, 1.0)
    assert len(keys) == 184 and bad == {"undecodable": 16}
    with pytest.raises(BadDataError, match=r"16 of 200 samples were bad \(undecodable 16\)"):
        load_in_memory(shards, (1, 6, 5), None, 0.05)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_resampled_stream_whose_server_is_gone_stops(tmp_path, workers):
    """Every shard open fails: after failed_shards_limit shards in a row, one error naming the
    last URL, instead of a stream that skips shards for ever and never yields a batch."""
    write_tiny(tmp_path, n=100, per_shard=50)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    shards = resolve(f"{base}/train-{{000000..000001}}.tar")  # its manifest: read while up
    server.shutdown()
    server.server_close()  # then gone: every connection is refused
    loader = StreamingLoader(
        shards, (1, 6, 5), 10, 0, num_workers=workers, resampled=True, epoch_steps=5
    )
    with pytest.raises(
        ShardError,
        match=r"^rank 0 loader worker 0: 10 shards in a row gave no usable sample, the last "
        rf"'{base}/train-00000[01]\.tar' \(.*Connection refused\): expected readable shards; "
        r"is the server up\?$",
    ):
        next(iter(loader.epoch_batches(0)))
