"""Append-only JSON-lines metrics file: one object per line, flushed as written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class JsonlLogger:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JsonlTracker:
    """The always-on tracker: every record goes to metrics.jsonl as it is."""

    run_id = None

    def __init__(self, path: Path) -> None:
        self.file = JsonlLogger(path)

    def log(self, record: dict[str, Any], step: int) -> None:
        self.file.log(record)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        pass  # the PNG files are in the run directory already

    def summary(self, values: dict[str, Any]) -> None:
        pass  # the final record and eval.json hold them

    def finish(self, exit_code: int = 0) -> None:
        self.file.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def step_values(path: str | Path, key: str = "loss/total") -> dict[int, float]:
    """One logged value per step from a metrics.jsonl; a step logged again after a resume
    counts with its last value (what the resumed run computed)."""
    return {r["step"]: r[key] for r in read_jsonl(path) if "event" not in r and key in r}
