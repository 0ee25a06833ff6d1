"""MNIST from its four IDX files: the embedded copy, a user's directory, or a checked download.

IDX format: a big-endian header (magic 2051 = uint8 images [N, H, W]; 2049 = uint8 labels [N])
followed by the raw bytes. Every file is checked: md5 of the .gz against the official value (when
`verify_md5`), the magic number, and that the payload size matches the header. A corrupt or
truncated file raises DataError naming the file; a bad dataset is never returned silently.
"""

from __future__ import annotations

import gzip
import shutil
import struct
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_vae.config.schema import DataConfig
from moe_vae.data.cache import default_cache
from moe_vae.data.digest import file_digest
from moe_vae.errors import MoeVaeError

EMBEDDED_DIR = Path(__file__).parent / "mnist_files"

# Official md5 of each .gz file (as published with the dataset and used by common loaders).
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_MAGIC = {2051: 3, 2049: 1}  # magic -> number of dimensions (uint8 data)


class DataError(MoeVaeError):
    """A missing, corrupt or truncated data file."""


@dataclass
class Split:
    images: np.ndarray  # uint8 [N, H, W]
    labels: np.ndarray  # int64 [N]


def read_idx(path: str | Path, expected_md5: str | None = None) -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw) into a uint8 array, checking it fully."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} not found")
    if expected_md5 is not None and (got := file_digest(path, "md5")) != expected_md5:
        raise DataError(
            f"data file {str(path)!r} is corrupt: md5 {got}, expected {expected_md5} "
            f"(delete it and download again; a modified copy on purpose: data.verify_md5=false "
            f"in training, --no-verify-md5 for moe-vae data write)"
        )
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"data file {str(path)!r} is not a readable gzip file: {err}") from None
    if len(raw) < 8:
        raise DataError(f"data file {str(path)!r} is truncated: {len(raw)} bytes, no IDX header")
    magic, _ = struct.unpack(">II", raw[:8])
    if magic not in _MAGIC:
        raise DataError(
            f"data file {str(path)!r} is not an MNIST IDX file: magic {magic}, expected 2051 "
            f"(images) or 2049 (labels)"
        )
    ndim = _MAGIC[magic]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"data file {str(path)!r} is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(
            f"data file {str(path)!r} is truncated or padded: {len(raw) - header} data bytes, "
            f"header {list(dims)} expects {expected}"
        )
    # A writable copy: torch refuses to share memory with a read-only buffer.
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find(root: Path, name: str) -> Path:
    """A file by its .gz name, or its decompressed twin."""
    for cand in (root / name, root / name.removesuffix(".gz")):
        if cand.is_file():
            return cand
    raise DataError(f"MNIST file {name!r} not found in {str(root)!r} (expected {name} or raw IDX)")


def idx_files(root: Path) -> dict[str, Path]:
    """The four IDX files in `root`, by their official .gz name (each may be stored raw)."""
    return {name: _find(root, name) for name in MNIST_FILES}


def download(root: Path, mirrors: list[str], verify_md5: bool = True) -> None:
    """Fetch any missing MNIST file into `root`, trying each mirror; md5-checked before use."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(
            f"data.root {str(root)!r}: cannot create it to download MNIST into: {err.strerror} "
            "(expected a writable directory)"
        ) from None
    for name, md5 in MNIST_FILES.items():
        target = root / name
        if target.is_file() and (not verify_md5 or file_digest(target, "md5") == md5):
            continue
        errors = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            # Download beside the target, then rename: a failed fetch never leaves a partial file.
            with tempfile.NamedTemporaryFile(dir=root, prefix=f".{name}.", delete=False) as tmp:
                tmp_path = Path(tmp.name)
                try:
                    with urllib.request.urlopen(url, timeout=60) as resp:
                        shutil.copyfileobj(resp, tmp)
                except OSError as err:
                    errors.append(f"{url}: {err}")
                    tmp_path.unlink(missing_ok=True)
                    continue
            if verify_md5 and (got := file_digest(tmp_path, "md5")) != md5:
                errors.append(f"{url}: md5 {got}, expected {md5}")
                tmp_path.unlink(missing_ok=True)
                continue
            tmp_path.replace(target)
            break
        else:
            raise DataError(f"could not download {name}: " + "; ".join(errors))


def mnist_root(cfg: DataConfig) -> Path:
    if cfg.source == "embedded":
        return EMBEDDED_DIR
    root = Path(cfg.root).expanduser() if cfg.root else default_cache() / "mnist"
    if cfg.source == "download":
        download(root, cfg.mirrors, cfg.verify_md5)
    elif not root.is_dir():
        raise DataError(
            f"data.root {str(root)!r} is not a directory (expected the MNIST IDX files)"
        )
    return root


def load_split(root: Path, split: str, verify_md5: bool = True) -> Split:
    prefix = "train" if split == "train" else "t10k"
    arrays = []
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{prefix}-{kind}-ubyte.gz"
        path = _find(root, name)
        # md5 values are those of the official .gz files; a raw copy is checked structurally.
        md5 = MNIST_FILES[name] if verify_md5 and path.suffix == ".gz" else None
        arrays.append(read_idx(path, md5))
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"MNIST {split} split in {str(root)!r}: images {images.shape} and labels "
            f"{labels.shape} do not match"
        )
    return Split(images, labels.astype(np.int64))


def load_mnist(cfg: DataConfig) -> tuple[Split, Split]:
    """(train, test) splits per the data config, limited to the first N samples if asked."""
    root = mnist_root(cfg)
    train = load_split(root, "train", cfg.verify_md5)
    test = load_split(root, "test", cfg.verify_md5)
    if cfg.train_limit:
        train = Split(train.images[: cfg.train_limit], train.labels[: cfg.train_limit])
    if cfg.test_limit:
        test = Split(test.images[: cfg.test_limit], test.labels[: cfg.test_limit])
    return train, test
