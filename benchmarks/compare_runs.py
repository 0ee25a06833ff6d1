"""Finished runs side by side, to check that a fast path trains as well as the eager one:
training time (the loop's own, summed over epochs), samples/s, the last epoch's training loss,
and the test metrics of the final evaluation.

Run: python benchmarks/compare_runs.py RUN_DIR [RUN_DIR ...]   (prints a Markdown table)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = ("run", "epochs", "train s", "samples/s", "final loss", "accuracy", "NMI", "neg ELBO")


def summarize(run_dir: Path) -> dict[str, Any]:
    """One run's row; ValueError naming the run and the missing file if it did not finish."""
    metrics, evaluation = run_dir / "metrics.jsonl", run_dir / "eval.json"
    for path in (metrics, evaluation):
        if not path.is_file():
            raise ValueError(f"{run_dir}: no {path.name} (expected a finished moe-vae run)")
    lines = metrics.read_text().splitlines()
    epochs = [r for r in map(json.loads, lines) if r.get("event") == "epoch"]
    if not epochs:
        raise ValueError(f"{metrics}: no epoch record (expected a finished moe-vae run)")
    ev = json.loads(evaluation.read_text())
    seconds = sum(r["epoch_seconds"] for r in epochs)
    samples = sum(r["samples_per_second"] * r["epoch_seconds"] for r in epochs)
    return {
        "run": run_dir.name,
        "epochs": len(epochs),
        "train s": seconds,
        "samples/s": samples / seconds if seconds else 0.0,
        "final loss": epochs[-1]["loss/total"],
        "accuracy": ev.get("accuracy"),
        "NMI": ev.get("nmi"),
        "neg ELBO": ev.get("neg_elbo"),
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    args = parser.parse_args(argv)
    try:
        rows = [summarize(run) for run in args.runs]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
