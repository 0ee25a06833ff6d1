"""Memory under load: does resident memory grow across epochs with many experts and workers?

Trains the founding recipe with --experts experts (default 256) from streamed shards with
--workers DataLoader workers (resampled shards, --steps steps per epoch), then prints the RSS of
the trainer and of its workers at the end of every epoch, and the growth per epoch after the
first (warm-up) epoch. A leak shows as a steady positive slope.

Run: python benchmarks/memory_soak.py [--experts 256] [--workers 4] [--epochs 8] [--steps 50]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moe_vae.track.jsonl import read_jsonl

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50, help="steps per epoch")
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable,
            "-m",
            "moe_vae",
            "train",
            "--config",
            str(REPO / "configs" / "mnist_seed.yaml"),
            f"--model.num_experts={args.experts}",
            f"--train.epochs={args.epochs}",
            f"--train.batch_size={args.batch}",
            "--data.loader=stream",
            f"--data.num_workers={args.workers}",
            "--data.resampled=true",
            f"--data.epoch_steps={args.steps}",
            "--eval.every_epochs=0",
            "--track.wandb=disabled",
            f"--output.dir={out}",
            "--output.name=soak",
            "--quiet",
        ]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO)
        wall = time.perf_counter() - t0
        epochs = [
            r for r in read_jsonl(Path(out) / "soak" / "metrics.jsonl") if r.get("event") == "epoch"
        ]

    print(
        f"{args.experts} experts, {args.workers} workers, {args.steps} steps x {args.batch} "
        f"per epoch, {len(epochs)} epochs in {wall:.0f} s"
    )
    print(f"{'epoch':>5} {'trainer RSS MB':>15} {'children USS MB':>15} {'samples/s':>10}")
    for r in epochs:
        print(
            f"{r['epoch']:>5} {r['memory/rss_mb']:>15.1f} {r['memory/children_uss_mb']:>15.1f} "
            f"{r['samples_per_second']:>10.0f}"
        )
    if len(epochs) >= 3:
        first, last = epochs[1], epochs[-1]
        n = last["epoch"] - first["epoch"]
        for key, label in (("memory/rss_mb", "trainer"), ("memory/children_uss_mb", "children")):
            slope = (last[key] - first[key]) / n
            print(
                f"{label}: {first[key]:.1f} MB after epoch {first['epoch']} -> {last[key]:.1f} MB "
                f"after epoch {last['epoch']}: {slope:+.2f} MB/epoch "
                f"(ratio {last[key] / max(first[key], 1e-9):.3f})"
            )


if __name__ == "__main__":
    main()
