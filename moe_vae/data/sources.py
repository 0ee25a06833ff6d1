"""Sample sources for the shard writer: MNIST IDX files, .npz/.npy arrays, image folders.

Each source yields `RawSample`s: a unique key, a uint8 image [H, W] or [H, W, C], and a label
(-1 when unknown). Labels travel with the samples for evaluation and semi-supervised training
(loss.label_fraction, loss.labelled_keys); unsupervised training never needs them.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe_vae.data.mnist import DataError, load_split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
UNKNOWN_LABEL = -1


@dataclass
class RawSample:
    key: str
    image: np.ndarray  # uint8 [H, W] or [H, W, C]
    label: int = UNKNOWN_LABEL


@dataclass
class Source:
    """A finite set of samples of one image shape, with its size known before writing."""

    samples: Iterator[RawSample]
    num_samples: int
    image_shape: tuple[int, ...]
    class_names: list[str] | None = None


def _key(prefix: str, index: int) -> str:
    # No dots: webdataset splits a member name into key and extension at the first dot.
    return f"{prefix}{index:08d}"


def from_arrays(images: np.ndarray, labels: np.ndarray | None, prefix: str) -> Source:
    if images.dtype != np.uint8:
        raise DataError(f"images must be uint8 (0-255), got {images.dtype}")
    if images.ndim not in (3, 4):
        raise DataError(f"images must be [N, H, W] or [N, H, W, C], got shape {images.shape}")
    if labels is not None and len(labels) != len(images):
        raise DataError(f"{len(images)} images but {len(labels)} labels")

    def gen() -> Iterator[RawSample]:
        for i, image in enumerate(images):
            label = int(labels[i]) if labels is not None else UNKNOWN_LABEL
            yield RawSample(_key(prefix, i), image, label)

    return Source(gen(), len(images), tuple(images.shape[1:]))


def mnist_source(root: Path, split: str, verify_md5: bool = True) -> Source:
    data = load_split(root, split, verify_md5)
    return from_arrays(data.images, data.labels, f"{split}-")


def array_source(path: Path, prefix: str = "") -> Source:
    """A .npy file of images, or a .npz with `images` (or `x`) and optional `labels` (or `y`)."""
    if not path.is_file():
        raise DataError(f"array file {str(path)!r} not found")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"array file {str(path)!r} is not a readable .npy/.npz: {err}") from None
    if isinstance(loaded, np.ndarray):
        return from_arrays(loaded, None, prefix)
    with loaded:
        names = set(loaded.files)
        img_name = next((n for n in ("images", "x", "X") if n in names), None)
        if img_name is None:
            raise DataError(
                f"{str(path)!r} has arrays {sorted(names)}: expected one named 'images' (or 'x')"
            )
        lab_name = next((n for n in ("labels", "y", "Y") if n in names), None)
        images = _npz_member(loaded, img_name, path)
        labels = _npz_member(loaded, lab_name, path) if lab_name else None
        return from_arrays(images, labels, prefix)


def _npz_member(npz: Any, name: str, path: Path) -> np.ndarray:
    """One array of an .npz: its members are only read (and can only fail) when accessed."""
    try:
        return np.asarray(npz[name])
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(
            f"array {name!r} in {str(path)!r} cannot be read: {err} (expected a plain numeric "
            f"array, uint8 images or integer labels; object arrays are refused because reading "
            f"them would run pickled code)"
        ) from None


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im)
    # UnidentifiedImageError and truncated files are OSErrors; a decompression bomb (an image
    # too large to be real) is bad input too.
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(
            f"image {str(path)!r} cannot be decoded: {err} (expected a PNG or JPEG file)"
        ) from None


def image_folder_source(root: Path, prefix: str = "") -> Source:
    """PNG/JPEG files under `root`; with class sub-folders, the sorted folder index is the label."""
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if classes:
        files = [
            (path, label)
            for label, name in enumerate(classes)
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
    else:
        files = [
            (p, UNKNOWN_LABEL) for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES
        ]
    if not files:
        raise DataError(f"image folder {str(root)!r} holds no .png/.jpg/.jpeg files")
    shape = _read_image(files[0][0]).shape  # every later image is held to the first's

    def gen() -> Iterator[RawSample]:
        for i, (path, label) in enumerate(files):
            image = _read_image(path)
            if image.shape != shape or image.dtype != np.uint8:
                raise DataError(
                    f"image {str(path)!r} is {image.shape} {image.dtype}, expected {shape} uint8 "
                    f"like {str(files[0][0])!r}"
                )
            yield RawSample(_key(prefix, i), image, label)

    return Source(gen(), len(files), tuple(shape), classes or None)
