"""What one tar record holds, both ways: encoding for the writer, decoding for the pipeline.

Two record kinds, told apart by their members, so the reader detects which one it got:
- "sample" (standard WebDataset): `<key>.npy` (or `.png` / `.jpg` written by others) + `<key>.cls`;
- "batched" (ours, fast for small images): `<rkey>.images.npy` [n, H, W(, C)] uint8,
  `<rkey>.labels.npy` int64 [n] (-1 = unknown), `<rkey>.keys.json` (the n sample keys).
Decoding yields `Decoded` samples with images as uint8 [C, H, W]; anything that cannot be used
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
class Decoded:
    key: str
    image: np.ndarray  # uint8 [C, H, W]
    label: int


class BadSampleCounter:
    """Counts skipped samples by reason. Also a webdataset exception handler: returning True
    means "skip and go on" (webdataset's warn_and_continue sleeps 0.5 s per error instead)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] += n

    def __call__(self, exn: Exception) -> bool:
        # Errors webdataset reports while opening a shard or reading its tar stream.
        text = f"{type(exn).__name__}: {exn}".lower()
        self.add("unreadable_shard" if "open" in text or "no such file" in text else "tar_error")
        return True


def to_chw(image: np.ndarray) -> np.ndarray:
    """[H, W] -> [1, H, W]; [H, W, C] -> [C, H, W]."""
    return image[None] if image.ndim == 2 else np.ascontiguousarray(image.transpose(2, 0, 1))


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


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
    """Tar records -> `Decoded` samples of one image shape (picklable, runs in loader workers).

    `expected_shape` ([C, H, W]) is checked for every sample; None accepts the first good
    sample's shape and holds every later one to it.
    """

    def __init__(self, expected_shape: tuple[int, int, int] | None, counter: BadSampleCounter):
        self.expected_shape = expected_shape
        self.counter = counter

    def _check(self, key: str, image: np.ndarray, label: int) -> Decoded | None:
        if image.dtype != np.uint8:
            self.counter.add("wrong_dtype")
            return None
        if image.ndim not in (2, 3):
            self.counter.add("wrong_shape")
            return None
        chw = to_chw(image)
        if self.expected_shape is None:
            self.expected_shape = chw.shape  # type: ignore[assignment]
        if chw.shape != self.expected_shape:
            self.counter.add("wrong_shape")
            return None
        return Decoded(key, chw, label)

    def _batched(self, record: dict[str, Any]) -> Iterator[Decoded]:
        try:
            images = _load_npy(record["images.npy"])
            labels = _load_npy(record["labels.npy"]) if "labels.npy" in record else None
            keys = json.loads(record["keys.json"]) if "keys.json" in record else None
        except (ValueError, OSError, KeyError):
            self.counter.add("undecodable")
            return
        n = len(images) if images.ndim else 0
        if labels is None:
            labels = np.full(n, UNKNOWN_LABEL)
        if keys is None:
            keys = [f"{record['__key__']}/{i}" for i in range(n)]
        if len(labels) != n or len(keys) != n:
            self.counter.add("undecodable", max(n, 1))
            return
        for key, image, label in zip(keys, images, labels, strict=True):
            out = self._check(key, image, int(label))
            if out is not None:
                yield out

    def __call__(self, records: Iterable[dict[str, Any]]) -> Iterator[Decoded]:
        for record in records:
            if "images.npy" in record:
                yield from self._batched(record)
                continue
            try:
                image = _decode_image(record)
            except Exception:  # any decoder failure is one undecodable sample
                self.counter.add("undecodable")
                continue
            if image is None:
                self.counter.add("missing_image")
                continue
            try:
                label = int(record["cls"]) if "cls" in record else UNKNOWN_LABEL
            except ValueError:
                self.counter.add("bad_label")
                continue
            out = self._check(record["__key__"], image, label)
            if out is not None:
                yield out
