"""Anomaly detection on MNIST, the standard protocol: train on 9 digits, the held-out digit is
the anomaly; score the whole test set with `moe-vae score` (mixture negative log-likelihood,
higher = more anomalous) and report the AUROC per held-out digit.

Every step goes through the CLI: `moe-vae data write --from array` (the 9 digits, with labels),
`moe-vae train` on those shards, `moe-vae score` on the full test split. With --labels, training
also uses every label (semi-supervised mode, `loss.label_fraction=1`; the 9 classes map to 9 of
the 10 experts).

Run: python benchmarks/anomaly.py [--digits 0 1 ...] [--epochs 5] [--labels] [any train override]
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from moe_vae.data.mnist import EMBEDDED_DIR, load_split

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "moe_vae"]


def _run(*args: str) -> None:
    subprocess.run([*CLI, *args], check=True, cwd=REPO)


def held_out_auroc(digit: int, epochs: int, labels: bool, extra: list[str], work: Path) -> float:
    train = load_split(EMBEDDED_DIR, "train")
    keep = train.labels != digit
    labels_in = train.labels[keep]
    if labels:  # classes 0..8 after removing the held-out digit: label c -> expert c
        labels_in = np.where(labels_in > digit, labels_in - 1, labels_in)
    arrays = work / f"no{digit}.npz"
    np.savez(arrays, images=train.images[keep], labels=labels_in)
    shards = work / f"shards{digit}"
    _run("data", "write", "--from", "array", "--input", str(arrays), "--out", str(shards),
         "--name", "train", "--no-progress")  # fmt: skip
    pattern = sorted(shards.glob("train-*.tar"))
    spec = f"{shards}/train-{{000000..{len(pattern) - 1:06d}}}.tar"
    run = work / f"run{digit}"
    _run(
        "train", "--config", str(REPO / "configs" / "mnist_seed.yaml"), "--data.name=shards",
        f"--data.train_shards={spec}", f"--train.epochs={epochs}", "--track.wandb=disabled",
        f"--output.dir={work}", f"--output.name={run.name}", "--quiet",
        *(["--loss.label_fraction=1"] if labels else []), *extra,
    )  # fmt: skip
    test_shards = work / "test"
    if not test_shards.exists():
        _run("data", "write", "--from", "mnist", "--split", "test", "--out", str(test_shards),
             "--name", "test", "--no-progress")  # fmt: skip
    scores = work / f"scores{digit}.csv"
    tests = sorted(test_shards.glob("test-*.tar"))
    _run("score", "--checkpoint", str(run), "--out", str(scores),
         "--shards", f"{test_shards}/test-{{000000..{len(tests) - 1:06d}}}.tar")  # fmt: skip
    with scores.open() as f:
        rows = list(csv.DictReader(f))
    is_anomaly = [int(r["label"]) == digit for r in rows]
    return float(roc_auc_score(is_anomaly, [float(r["nll"]) for r in rows]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--digits", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--labels", action="store_true", help="also train on every label")
    args, extra = ap.parse_known_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for d in args.digits:
            results[d] = held_out_auroc(d, args.epochs, args.labels, extra, Path(tmp))
            print(f"held-out digit {d}: AUROC {results[d]:.3f}", flush=True)
    mode = "with labels" if args.labels else "unsupervised"
    print(f"\n{mode}, {args.epochs} epochs, founding recipe {' '.join(extra)}")
    print("digit  " + " ".join(f"{d:>5}" for d in results) + "   mean")
    print("AUROC  " + " ".join(f"{v:5.3f}" for v in results.values())
          + f"  {np.mean(list(results.values())):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
