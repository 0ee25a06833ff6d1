"""What one tar record holds, both ways: encoding for the writer, decoding for the pipeline.

Two record kinds, told apart by their members, so the reader detects which one it got:
- "sample" (standard WebDataset): `<key>.npy` (or `.png` / `.jpg` written by others) + `<key>.cls`;
- "batched" (ours, fast for small images): `<rkey>.images.npy` [n, H, W(, C)] uint8,
  `<rkey>.labels.npy` int64 [n] (-1 = unknown), `<rkey>.keys.json` (the n sample keys).
Decoding yields `Chunk`s of samples with images as uint8 [n, C, H, W]; anything that cannot be used
is skipped and counted by reason in a `BadSampleCounter`, never raised.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_vae.data.sources import UNKNOWN_LABEL, RawSample

RECORD_KINDS = ("batched", "sample")
IMAGE_MEMBERS = ("npy", "png", "jpg", "jpeg")


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_sample(s: RawSample) -> dict[str, Any]:
    record: dict[str, Any] = {"__key__": s.key, "npy": npy_bytes(s.image)}
    if s.label != UNKNOWN_LABEL:
        record["cls"] = str(s.label).encode()
    return record


def encode_batch(samples: list[RawSample], record_key: str) -> dict[str, Any]:
    return {
        "__key__": record_key,
        "images.npy": npy_bytes(np.stack([s.image for s in samples])),
        "labels.npy": npy_bytes(np.array([s.label for s in samples], dtype=np.int64)),
        "keys.json": json.dumps([s.key for s in samples]).encode(),
    }


@dataclass
class Chunk:
    """Decoded samples of one record: one for a "sample" record, up to record_size for "batched"."""

    images: np.ndarray  # uint8 [n, C, H, W]
    labels: np.ndarray  # int64 [n], -1 = unknown
    keys: np.ndarray  # str [n]

    def __len__(self) -> int:
        return len(self.labels)


class BadSampleCounter:
    """Counts skipped samples by reason. Also a webdataset exception handler: returning True
    means "skip and go on" (webdataset's warn_and_continue sleeps 0.5 s per error instead)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.last_error = ""  # the latest error webdataset reported, for a message

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] += n

    def __call__(self, exn: Exception) -> bool:
        # Errors webdataset reports while opening a shard or reading its tar stream. It appends
        # the stream and URL to their args: the message is the first.
        text = f"{type(exn).__name__}: {exn}".lower()
        self.last_error = f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"
        self.add("unreadable_shard" if "open" in text or "no such file" in text else "tar_error")
        return True


def to_chw(images: np.ndarray) -> np.ndarray:
    """[n, H, W] -> [n, 1, H, W]; [n, H, W, C] -> [n, C, H, W]."""
    if images.ndim == 3:
        return images[:, None]
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def key_list(data: bytes, n: int | None = None) -> list[Any]:
    """A batched record's keys.json: a JSON list (of `n` keys, when given)."""
    keys = json.loads(data)  # a ValueError too when not UTF-8
    if not isinstance(keys, list):
        raise ValueError(f"keys.json holds a {type(keys).__name__}, not a list")
    if n is not None and len(keys) != n:
        raise ValueError(f"keys.json lists {len(keys)} keys for {n} images")
    return keys


def _label_vector(data: bytes, n: int) -> np.ndarray:
    labels = _load_npy(data)
    if labels.shape != (n,):
        raise ValueError(f"labels.npy has shape {labels.shape} for {n} images")
    return labels


def record_size(record: dict[str, Any]) -> int:
    """How many samples an unusable batched record held, to count them all as bad: its key
    list's length when that is readable, else its labels', else 1 (where the shard's sample
    count is known, what this misses is charged when the shard ends: pipeline.read_shards)."""
    for member, load in (("keys.json", key_list), ("labels.npy", _load_npy)):
        try:
            size = len(load(record[member]))
        except (KeyError, ValueError, OSError, TypeError):  # missing, corrupt, or 0-d
            continue
        return max(size, 1)
    return 1


def _decode_image(sample: dict[str, Any]) -> np.ndarray | None:
    for ext in IMAGE_MEMBERS:
        if ext in sample:
            if ext == "npy":
                return _load_npy(sample[ext])
            from PIL import Image

            with Image.open(io.BytesIO(sample[ext])) as im:
                return np.asarray(im)
    return None


class RecordDecoder:
    """Tar records -> `Chunk`s of samples of one image shape (picklable: runs in loader workers).

    `expected_shape` ([C, H, W]) is checked for every record; None accepts the first good
    record's shape and holds every later one to it.
    """

    def __init__(self, expected_shape: tuple[int, int, int] | None, counter: BadSampleCounter):
        self.expected_shape = expected_shape
        self.counter = counter

    def _chunk(self, images: np.ndarray, labels: np.ndarray, keys: list[str]) -> Chunk | None:
        """images: [n, H, W] or [n, H, W, C] as stored; all n are skipped if it does not fit."""
        n = len(labels)
        if images.dtype != np.uint8:
            self.counter.add("wrong_dtype", n)
            return None
        if images.ndim not in (3, 4):
            self.counter.add("wrong_shape", n)
            return None
        chw = to_chw(images)
        if self.expected_shape is None:
            self.expected_shape = tuple(chw.shape[1:])  # type: ignore[assignment]
        if chw.shape[1:] != self.expected_shape:
            self.counter.add("wrong_shape", n)
            return None
        return Chunk(chw, labels.astype(np.int64, copy=False), np.asarray(keys))

    def _batched(self, record: dict[str, Any]) -> Chunk | None:
        # Every member is checked here, inside the try: a keys.json that is valid JSON but not
        # a list, or a 0-d labels.npy, is an undecodable record, not a TypeError in a worker.
        try:
            images = _load_npy(record["images.npy"])
            n = len(images)  # a TypeError when 0-d
            labels = (
                _label_vector(record["labels.npy"], n)
                if "labels.npy" in record
                else np.full(n, UNKNOWN_LABEL)
            )
            keys = (
                key_list(record["keys.json"], n)
                if "keys.json" in record
                else [f"{record['__key__']}/{i}" for i in range(n)]
            )
        except (ValueError, OSError, TypeError):
            self.counter.add("undecodable", record_size(record))
            return None
        return self._chunk(images, labels, keys)

    def _single(self, record: dict[str, Any]) -> Chunk | None:
        try:
            image = _decode_image(record)
        except Exception:  # any decoder failure is one undecodable sample
            self.counter.add("undecodable")
            return None
        if image is None:
            self.counter.add("missing_image")
            return None
        try:
            label = int(record["cls"]) if "cls" in record else UNKNOWN_LABEL
        except ValueError:
            self.counter.add("bad_label")
            return None
        return self._chunk(image[None], np.array([label]), [record["__key__"]])

    def __call__(self, records: Iterable[dict[str, Any]]) -> Iterator[Chunk]:
        for record in records:
            chunk = self._batched(record) if "images.npy" in record else self._single(record)
            if chunk is not None and len(chunk):
                yield chunk
