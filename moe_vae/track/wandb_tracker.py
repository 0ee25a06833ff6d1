"""W&B behind the tracker interface. `wandb` is imported here only, when enabled.

W&B never stops training: if it fails to start (or to log later), the run goes on without it and
says so once. Its start is bounded by track.init_timeout (its own default would wait 90 s for an
unreachable server). Offline runs are written under <run dir>/wandb/ and uploaded later with
`wandb sync <run dir>/wandb/offline-run-*`.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from moe_vae.config.schema import TrackConfig


class WandbTracker:
    def __init__(
        self, cfg: TrackConfig, run_dir: Path, config: dict[str, Any], resume_id: str | None
    ) -> None:
        self.run: Any = None
        self.run_id: str | None = None
        try:
            import wandb

            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.name or run_dir.name,
                group=cfg.group,
                tags=cfg.tags or None,
                dir=str(run_dir),
                config=config,
                mode=cfg.wandb,
                id=resume_id,
                resume="allow" if resume_id else None,
                settings=wandb.Settings(init_timeout=cfg.init_timeout, console="off"),
            )
            self.run_id = self.run.id
        except Exception as err:  # W&B is optional: any failure leaves training running
            self._fail("start", err)

    def _fail(self, what: str, err: BaseException) -> None:
        print(
            f"moe-vae: W&B failed to {what} ({type(err).__name__}: {err}); "
            f"training continues without it (metrics.jsonl has everything)",
            file=sys.stderr,
        )
        self.run = None

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        numeric = {
            k: v
            for k, v in record.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }
        try:
            self.run.log(numeric, step=step)
        except Exception as err:
            self._fail("log", err)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        if self.run is None:
            return
        try:
            import wandb

            self.run.log({k: wandb.Image(str(p)) for k, p in images.items()}, step=step)
        except Exception as err:
            self._fail("log images", err)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            for key, value in values.items():
                if isinstance(value, int | float | str):
                    self.run.summary[key] = value
        except Exception as err:
            self._fail("write the summary", err)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as err:
            self._fail("finish", err)
