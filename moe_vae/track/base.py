"""The tracker interface and the fan-out to the JSON-lines file and W&B."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from moe_vae.config.schema import Config


class Tracker(Protocol):
    run_id: str | None

    def log(self, record: dict[str, Any], step: int) -> None:
        """A record of metrics at a training step (non-numeric values are the file's only)."""

    def log_images(self, images: dict[str, Path], step: int) -> None:
        """PNG files, by metric name."""

    def summary(self, values: dict[str, Any]) -> None:
        """Final values of the run."""

    def finish(self, exit_code: int = 0) -> None:
        """End the run; a non-zero exit_code marks it stopped early (pre-emption, failure)."""


class MultiTracker:
    def __init__(self, trackers: list[Any]) -> None:
        self.trackers = trackers

    @property
    def run_id(self) -> str | None:
        return next((t.run_id for t in self.trackers if t.run_id), None)

    def log(self, record: dict[str, Any], step: int) -> None:
        for t in self.trackers:
            t.log(record, step)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        for t in self.trackers:
            t.log_images(images, step)

    def summary(self, values: dict[str, Any]) -> None:
        for t in self.trackers:
            t.summary(values)

    def finish(self, exit_code: int = 0) -> None:
        for t in self.trackers:
            t.finish(exit_code)


def build_tracker(
    cfg: Config, run_dir: Path, config_dict: dict[str, Any], resume_id: str | None = None
) -> MultiTracker:
    """The JSON-lines file, plus W&B unless track.wandb is 'disabled' (rank 0 only)."""
    from moe_vae.track.jsonl import JsonlTracker

    trackers: list[Any] = [JsonlTracker(run_dir / "metrics.jsonl")]
    if cfg.track.wandb != "disabled":
        from moe_vae.track.wandb_tracker import WandbTracker

        trackers.append(WandbTracker(cfg.track, run_dir, config_dict, resume_id))
    return MultiTracker(trackers)
