"""Shard lists: brace patterns and URLs expanded, checked before training, counted.

A shard is a local path, an `http(s)://` URL, or a `pipe:` command (webdataset's gopen opens all
three). Sample counts per shard come from a manifest written by `moe-vae data write` (found beside
local shards, or fetched from beside http(s) shards as `<name>.manifest.json`, the writer's
name), or are counted by reading local shards once.
"""

from __future__ import annotations

import json
import re
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand

from moe_vae.data.records import BadSampleCounter, RecordDecoder, key_list
from moe_vae.errors import MoeVaeError


class ShardError(MoeVaeError):
    """A shard list that matches nothing, or shards that cannot be read."""


@dataclass
class ShardSet:
    urls: list[str]
    counts: list[int] | None  # samples per shard, when known
    image_shape: tuple[int, int, int] | None  # [C, H, W], when known
    class_names: list[str] | None = None

    @property
    def num_samples(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand(spec: str | list[str]) -> list[str]:
    """`data/train-{000000..000009}.tar` (or a list of such) -> the shard URLs, in order."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    return [url for s in specs for url in braceexpand.braceexpand(s)]


def _covering(
    manifests: list[tuple[str, Path | str, Any]], keys: list[str]
) -> tuple[dict[str, int], dict[str, Any]] | None:
    """Sample counts of `keys` (local paths or URLs) from (source, base, manifest) triples, the
    shards named relative to `base` (a folder, or a URL's directory), if they cover every key.
    The metadata returned is that of the manifest listing the first key."""
    counts: dict[str, int] = {}
    meta: dict[str, Any] = {}
    for source, base, manifest in manifests:

        def where(file: str, base: Path | str = base) -> str:
            return str(base / file) if isinstance(base, Path) else f"{base}/{file}"

        try:
            listed = {where(s["file"]): int(s["samples"]) for s in manifest["shards"]}
        except (ValueError, KeyError, TypeError) as err:
            raise ShardError(f"manifest {source!r} is unreadable: {err}") from None
        counts.update(listed)
        if keys[0] in listed:
            meta = manifest
    return (counts, meta) if all(k in counts for k in keys) else None


def _manifest_counts(paths: list[Path]) -> tuple[dict[str, int], dict[str, Any]] | None:
    """Counts from the `*.manifest.json` files beside local shards (see _covering)."""
    manifests: list[tuple[str, Path | str, Any]] = []
    for folder in sorted({p.parent for p in paths}):
        for mpath in sorted(folder.glob("*.manifest.json")):
            try:
                manifests.append((str(mpath), folder, json.loads(mpath.read_text())))
            except ValueError as err:
                raise ShardError(f"manifest {str(mpath)!r} is unreadable: {err}") from None
    return _covering(manifests, [str(p) for p in paths])


# The writer's shard names: <name>-<6 digits>.tar, beside <name>.manifest.json.
_WRITER_SHARD = re.compile(r"^(?P<name>.+)-\d{6}\.tar$")
MANIFEST_FETCH_TIMEOUT = 30.0  # seconds per manifest; an unreachable server fails, not hangs


def _remote_manifest_counts(urls: list[str]) -> tuple[dict[str, int], dict[str, Any]] | None:
    """Counts of http(s) shards from the manifests beside them, named after the writer's shard
    names (see _covering); None where a shard is not named so or its manifest is not there."""
    groups: dict[str, None] = {}  # manifest URLs, in the shards' order
    for url in urls:
        base, _, file = url.rpartition("/")
        named = _WRITER_SHARD.match(file)
        if named is None:
            return None
        groups[f"{base}/{named['name']}.manifest.json"] = None
    manifests: list[tuple[str, Path | str, Any]] = []
    for murl in groups:
        try:
            with urllib.request.urlopen(murl, timeout=MANIFEST_FETCH_TIMEOUT) as response:
                manifests.append((murl, murl.rpartition("/")[0], json.loads(response.read())))
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise ShardError(f"manifest {murl!r} could not be fetched: {err}") from None
        except (OSError, ValueError) as err:
            raise ShardError(f"manifest {murl!r} could not be read: {err}") from None
    return _covering(manifests, urls)


def http_status(url: str) -> str | None:
    """What the server says to an http(s) shard that read as empty: curl (webdataset's opener)
    is run silent, so the tar reader reports only "empty file". One request for the first
    byte; None where it succeeds or the URL is not http(s)."""
    if not url.startswith(("http://", "https://")):
        return None
    request = urllib.request.Request(url, headers={"Range": "bytes=0-0"})
    try:
        with urllib.request.urlopen(request, timeout=MANIFEST_FETCH_TIMEOUT) as response:
            response.read(1)
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code} {err.reason}"
    except urllib.error.URLError as err:
        return str(err.reason)
    except OSError as err:
        return str(err)
    return None


def count_samples(url: str) -> int:
    """Samples in one shard, by reading it (decoding only batched records' key lists)."""
    import webdataset as wds

    counter = BadSampleCounter()
    records = wds.tarfile_samples([{"url": url}], handler=counter)
    n = 0
    for record in records:
        n += _batched_size(url, record) if "keys.json" in record else 1
    return n


def _batched_size(url: str, record: dict[str, Any]) -> int:
    """Samples in a batched record, from its key list: without a readable list the shard's size
    (and so the epoch's plan) is unknown."""
    try:
        keys = key_list(record["keys.json"])
    except ValueError as err:
        raise ShardError(
            f"shard {url!r}: record {record.get('__key__')!r} has a corrupt keys.json ({err}): "
            f"expected a JSON list of the record's sample keys; rewrite the shard"
        ) from None
    return len(keys)


def resolve(spec: str | list[str], count: bool = True) -> ShardSet:
    """Expand and check a shard spec; counts from manifests, else by reading local shards."""
    urls = expand(spec)
    if not urls:
        raise ShardError(f"shard list {spec!r} is empty")
    local = [Path(u) for u in urls if not is_remote(u)]
    missing = [p for p in local if not p.is_file()]
    if missing and len(missing) == len(urls):
        raise ShardError(f"shard list {spec!r} matches nothing (first: {str(missing[0])!r})")
    if missing:
        raise ShardError(
            f"shard list {spec!r}: {len(missing)} of {len(urls)} shards missing, "
            f"first {str(missing[0])!r}"
        )
    image_shape = None
    class_names = None
    counts = None
    found = None
    if len(local) == len(urls):
        found = _manifest_counts(local)
        keys = [str(p) for p in local]
    elif all(u.startswith(("http://", "https://")) for u in urls):
        found = _remote_manifest_counts(urls)
        keys = urls
    if found is not None:
        by_key, meta = found
        counts = [by_key[k] for k in keys]
        shape = meta.get("image_shape")
        if shape:
            image_shape = (1, *shape) if len(shape) == 2 else (shape[2], shape[0], shape[1])
        class_names = meta.get("class_names")
    elif count and len(local) == len(urls):
        counts = [count_samples(u) for u in urls]
    return ShardSet(urls, counts, image_shape, class_names)


def preflight(shards: ShardSet) -> tuple[int, int, int]:
    """Read the first shard's first usable sample: an unreadable first shard stops here, before
    training, with one clear error. Returns the image shape [C, H, W]."""
    import webdataset as wds

    url = shards.urls[0]
    counter = BadSampleCounter()
    decoder = RecordDecoder(shards.image_shape, counter)
    try:
        first = next(iter(decoder(wds.tarfile_samples([{"url": url}], handler=counter))), None)
    except (OSError, tarfile.TarError) as err:
        raise ShardError(f"first shard {url!r} is unreadable: {err}") from None
    if first is None:
        reasons = ", ".join(f"{k}: {v}" for k, v in counter.counts.items()) or "no samples"
        status = http_status(url)
        if status is not None:
            raise ShardError(f"first shard {url!r} could not be fetched: {status}")
        raise ShardError(f"first shard {url!r} has no usable sample ({reasons})")
    return first.images.shape[1:]  # type: ignore[return-value]
