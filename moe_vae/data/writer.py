"""Write a Source to WebDataset tar shards plus a manifest.

Files: `<name>-000000.tar`, `<name>-000001.tar`, ... and `<name>.manifest.json` (record kind,
image shape, dtype, per-shard sample counts and sha256, the brace pattern of the shard list).
Each shard is written under a temporary name of its own (unique per process, so concurrent writers
of one directory cannot mix their bytes) and renamed when complete; the manifest is written last,
so a directory with a manifest holds a complete, checked set of shards. Tar headers carry a
fixed mtime, so the same input always gives byte-identical shards.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from moe_vae.data.digest import file_digest
from moe_vae.data.records import RECORD_KINDS, encode_batch, encode_sample
from moe_vae.data.sources import RawSample, Source
from moe_vae.errors import MoeVaeError

MANIFEST_VERSION = 1


@dataclass
class WriteOptions:
    samples_per_shard: int = 10_000
    record: str = "batched"  # or "sample" (standard WebDataset, one image per tar member)
    record_size: int = 1_000  # samples per batched record

    def __post_init__(self) -> None:
        if self.record not in RECORD_KINDS:
            raise MoeVaeError(
                f"record kind {self.record!r} unknown, expected one of {RECORD_KINDS}"
            )
        if self.samples_per_shard < 1 or self.record_size < 1:
            raise MoeVaeError("samples_per_shard and record_size must be >= 1")


def manifest_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}.manifest.json"


def _temp_beside(path: Path) -> Path:
    """A temporary name beside `path`, unique to this process and call: concurrent writers of
    one directory (ranks filling a node-local cache) never write into each other's file."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _write_shard(path: Path, samples: list[RawSample], opts: WriteOptions) -> str:
    """Writes one shard atomically; returns its sha256 (of the bytes written here)."""
    import webdataset as wds

    tmp = _temp_beside(path)
    try:
        with tmp.open("xb") as f:
            writer = wds.TarWriter(f, encoder=False, mtime=0.0)
            if opts.record == "sample":
                for s in samples:
                    writer.write(encode_sample(s))
            else:
                for start in range(0, len(samples), opts.record_size):
                    chunk = samples[start : start + opts.record_size]
                    key = f"{path.stem}r{start // opts.record_size:05d}"
                    writer.write(encode_batch(chunk, key))
            writer.close()
        digest = file_digest(tmp, "sha256")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest


def write_shards(
    source: Source, out_dir: Path, name: str, opts: WriteOptions, progress: bool = True
) -> dict[str, Any]:
    """Write every sample of `source`; returns the manifest (also written beside the shards)."""
    if not name or "/" in name or "." in name:
        raise MoeVaeError(f"shard name {name!r} must be non-empty, without '/' or '.'")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file in the way, a read-only or special file system
        raise MoeVaeError(
            f"shard directory {str(out_dir)!r}: cannot create it: {err.strerror or err}"
        ) from None
    manifest_path(out_dir, name).unlink(missing_ok=True)  # incomplete until rewritten at the end
    shards: list[dict[str, Any]] = []
    has_labels = False
    pending: list[RawSample] = []

    def flush() -> None:
        path = out_dir / f"{name}-{len(shards):06d}.tar"
        sha256 = _write_shard(path, pending, opts)
        shards.append({"file": path.name, "samples": len(pending), "sha256": sha256})
        pending.clear()

    bar = tqdm(total=source.num_samples, unit="img", desc=f"writing {name}", disable=not progress)
    for sample in source.samples:
        if tuple(sample.image.shape) != source.image_shape:
            raise MoeVaeError(
                f"sample {sample.key!r} has shape {sample.image.shape}, "
                f"expected {source.image_shape} like the first"
            )
        has_labels = has_labels or sample.label >= 0
        pending.append(sample)
        if len(pending) == opts.samples_per_shard:
            flush()
        bar.update()
    if pending:
        flush()
    bar.close()
    if not shards:
        raise MoeVaeError("the source holds no samples: nothing written")
    manifest = {
        "version": MANIFEST_VERSION,
        "record": opts.record,
        "image_shape": list(source.image_shape),
        "dtype": "uint8",
        "num_samples": sum(s["samples"] for s in shards),
        "has_labels": has_labels,
        "class_names": source.class_names,
        "pattern": f"{name}-{{000000..{len(shards) - 1:06d}}}.tar",
        "shards": shards,
    }
    target = manifest_path(out_dir, name)
    tmp = _temp_beside(target)
    try:
        with tmp.open("x") as f:
            f.write(json.dumps(manifest, indent=1))
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return manifest
