"""benchmarks/compare_runs.py reads finished runs into one table (how a GPU session checks that
the fast paths train as well as the eager one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from moe_vae.config import load_config
from moe_vae.train.trainer import train

REPO = Path(__file__).resolve().parents[2]
SCRIPT = [sys.executable, str(REPO / "benchmarks" / "compare_runs.py")]


def test_finished_runs_side_by_side(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    runs = []
    for name, extra in (("plain", []), ("deferred", ["--train.host_sync=log"])):
        cfg = load_config(
            "configs/tiny.yaml",
            [f"--output.dir={tmp_path}", f"--output.name={name}", "--track.wandb=disabled", *extra],
        )
        runs.append(train(cfg, quiet=True).run_dir)
    proc = subprocess.run([*SCRIPT, *map(str, runs)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    header, _, *rows = proc.stdout.splitlines()
    assert header.split(" | ")[5] == "accuracy" and len(rows) == 2
    for run, row in zip(runs, rows, strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == run.name and cells[1] == "2"  # tiny.yaml trains 2 epochs
        accuracy = json.loads((run / "eval.json").read_text())["accuracy"]
        assert abs(float(cells[5]) - accuracy) < 1e-3
        assert float(cells[2]) > 0 and float(cells[3].replace(",", "")) > 0


def test_an_unfinished_run_is_named(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "metrics.jsonl").write_text('{"event": "start"}\n')
    proc = subprocess.run([*SCRIPT, str(tmp_path / "half")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "half: no eval.json (expected a finished moe-vae run)" in proc.stderr
