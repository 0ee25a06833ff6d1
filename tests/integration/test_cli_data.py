"""End to end: `moe-vae data write` shards, then `moe-vae train` streams them."""

from __future__ import annotations

import json
import math
import shlex

import numpy as np
from test_cli_train import REPO, run_cli

from moe_vae.cli import _parser
from moe_vae.data.shardlist import expand

MNIST_SIZES = {"train": 60_000, "test": 10_000}


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
    assert epoch["data/refilled_steps"] == 0
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


def test_data_write_out_that_is_not_a_directory(tmp_path):
    """--out a file, or under one: one line naming --out, before the input is read, and the
    file is left as it was."""
    np.savez(tmp_path / "f.npz", images=np.zeros((4, 3, 3), np.uint8))
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for out, expected in (
        (afile, f"--out '{afile}' is a file: expected a directory"),
        (afile / "sub", f"--out '{afile / 'sub'}': '{afile}' is not a directory"),
    ):
        args = ["--from", "array", "--input", str(tmp_path / "f.npz"), "--out", str(out)]
        proc = run_cli("data", "write", *args, "--no-progress")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and expected in proc.stderr
    assert afile.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "f.npz"]


def test_write_from_a_modified_mnist_copy_needs_its_flag(tmp_path):
    """Other IDX data under MNIST's names fails the md5 check, with a hint this command can
    follow: --no-verify-md5."""
    import gzip
    import struct

    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        for kind, shape, magic in (("images-idx3", (n, 28, 28), 2051), ("labels-idx1", (n,), 2049)):
            data = rng.integers(0, 10 if kind.startswith("labels") else 256, shape, np.uint8)
            with gzip.open(tmp_path / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(struct.pack(f">I{len(shape)}I", magic, *shape) + data.tobytes())
    args = ["data", "write", "--from", "mnist", "--mnist-dir", str(tmp_path), "--no-progress"]
    proc = run_cli(*args, "--out", str(tmp_path / "a"))
    assert proc.returncode == 2
    assert (
        "is corrupt: md5" in proc.stderr and "--no-verify-md5 for moe-vae data write" in proc.stderr
    )
    proc = run_cli(*args, "--out", str(tmp_path / "b"), "--no-verify-md5")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "b" / "train.manifest.json").read_text())["num_samples"] == 30


def test_readme_data_example_writes_what_it_trains_from():
    """Every shard the README's Data example trains from is one its `data write` commands
    write (its test split was never written: the train command failed on a missing file).
    Checked from the commands' own parser, without writing 70,000 images."""
    text = (REPO / "README.md").read_text()
    block = text.split("\n## Data\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    written: set[str] = set()
    train_args: list[str] = []
    for line in block.replace("\\\n", " ").splitlines():
        args = shlex.split(line, comments=True)
        if args[:3] == ["moe-vae", "data", "write"] and args[args.index("--from") + 1] == "mnist":
            opts = _parser().parse_args(args[1:])
            name = opts.name or opts.split
            shards = math.ceil(MNIST_SIZES[opts.split] / opts.samples_per_shard)
            written.update(str(opts.out / f"{name}-{i:06d}.tar") for i in range(shards))
        elif args[:2] == ["moe-vae", "train"]:
            train_args = args[2:]
    specs = dict(a[2:].split("=", 1) for a in train_args if a.startswith("--data."))
    assert specs["data.name"] == "shards"
    for key in ("data.train_shards", "data.test_shards"):
        shards = expand(specs[key])
        assert shards and set(shards) <= written, (key, sorted(set(shards) - written))
    assert set(expand(specs["data.train_shards"])) == {w for w in written if "/train-" in w}
