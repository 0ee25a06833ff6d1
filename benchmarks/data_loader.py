"""Data-loader throughput: samples/s for 28x28 uint8 MNIST images from our shards.

Prints one row per (record kind, loader, workers) and the ratio to a uint8 tensor already in
memory. Run: python benchmarks/data_loader.py [--samples 60000] [--batch 100] [--epochs 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from moe_vae.data.loaders import InMemoryLoader, StreamingLoader, load_in_memory
from moe_vae.data.mnist import EMBEDDED_DIR, load_split
from moe_vae.data.shardlist import resolve
from moe_vae.data.sources import from_arrays
from moe_vae.data.writer import WriteOptions, write_shards


def _rate(loader, epochs: int) -> float:
    n, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        for batch in loader.epoch_batches(epoch):
            n += len(batch.keys)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=60_000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=10_000)
    args = ap.parse_args()
    torch.set_num_threads(1)

    split = load_split(EMBEDDED_DIR, "train")
    images, labels = split.images[: args.samples], split.labels[: args.samples]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for record in ("batched", "sample"):
            out = Path(tmp) / record
            t0 = time.perf_counter()
            manifest = write_shards(
                from_arrays(images, labels, "train-"),
                out,
                "train",
                WriteOptions(args.shard_size, record),
                progress=False,
            )
            write_rate = manifest["num_samples"] / (time.perf_counter() - t0)
            shards = resolve(str(out / manifest["pattern"]))
            print(f"wrote {record}: {write_rate:,.0f} samples/s, {len(shards.urls)} shards")
            for workers in (0, 1, 2):
                loader = StreamingLoader(
                    shards, (1, 28, 28), args.batch, 0, num_workers=workers, shuffle_buffer=10_000
                )
                rows.append((record, "stream", workers, _rate(loader, args.epochs)))
            t0 = time.perf_counter()
            mem = load_in_memory(shards, (1, 28, 28), None, 0.0)
            load_rate = args.samples / (time.perf_counter() - t0)
            loader = InMemoryLoader(mem[0], mem[1], mem[2], args.batch, 0)
            rows.append(
                (record, f"memory (loaded at {load_rate:,.0f}/s)", 0, _rate(loader, args.epochs))
            )

    # The reference: a uint8 tensor already in memory, shuffled and sliced, nothing else.
    x = torch.from_numpy(images)
    n, t0 = 0, time.perf_counter()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for i in range(len(x) // args.batch):
            n += len(x[perm[i * args.batch : (i + 1) * args.batch]])
    ref = n / (time.perf_counter() - t0)

    print(f"\n{'record':<8} {'loader':<32} {'workers':>7} {'samples/s':>12} {'vs tensor':>9}")
    for record, kind, workers, rate in rows:
        print(f"{record:<8} {kind:<32} {workers:>7} {rate:>12,.0f} {rate / ref:>9.2f}")
    print(f"{'-':<8} {'uint8 tensor in memory':<32} {0:>7} {ref:>12,.0f} {1:>9.2f}")


if __name__ == "__main__":
    main()
