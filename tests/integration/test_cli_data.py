"""End to end: `moe-vae data write` shards, then `moe-vae train` streams them."""

from __future__ import annotations

import json

import numpy as np
from test_cli_train import run_cli


def test_write_then_train_from_shards(tmp_path):
    out = tmp_path / "shards"
    for split in ("train", "test"):
        proc = run_cli(
            "data",
            "write",
            "--from",
            "mnist",
            "--split",
            split,
            "--out",
            str(out),
            "--samples-per-shard",
            "2500" if split == "train" else "5000",
            "--no-progress",
        )
        assert proc.returncode == 0, proc.stderr
        assert f"in {24 if split == 'train' else 2} shards" in proc.stdout
    manifest = json.loads((out / "train.manifest.json").read_text())
    assert manifest["num_samples"] == 60_000 and len(manifest["shards"]) == 24

    proc = run_cli(
        "train",
        "--config",
        "configs/tiny.yaml",
        "--data.name=shards",
        f"--data.train_shards={out}/train-{{000000..000023}}.tar",
        f"--data.test_shards={out}/test-{{000000..000001}}.tar",
        "--data.loader=stream",
        "--data.num_workers=2",
        "--data.train_limit=null",
        "--data.test_limit=null",
        "--train.max_steps=30",
        f"--output.dir={tmp_path}",
        "--output.name=run",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    start = records[0]
    assert start["loader"] == "StreamingLoader" and start["train_shards"] == 24
    assert start["train_samples"] == 60_000 and start["test_samples"] == 10_000
    epoch = next(r for r in records if r.get("event") == "epoch")
    assert epoch["data/bad_samples"] == 0 and epoch["step"] == 30
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert ev["num_samples"] == 10_000 and np.isfinite(ev["neg_elbo"])


def test_data_write_errors_are_clean(tmp_path):
    proc = run_cli(
        "data",
        "write",
        "--from",
        "images",
        "--input",
        str(tmp_path / "none"),
        "--out",
        str(tmp_path / "o"),
    )
    assert proc.returncode == 2
    assert "is not a directory" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli(
        "data", "write", "--from", "mnist", "--out", str(tmp_path / "o"), "--samples-per-shard", "0"
    )
    assert proc.returncode == 2 and "expected a positive integer, got 0" in proc.stderr
    assert not (tmp_path / "o").exists()
