"""The run directory: created before anything is computed, never overwritten by accident."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from moe_vae.config.schema import OutputConfig
from moe_vae.errors import MoeVaeError
from moe_vae.outpaths import why_not_writable

# Files every run directory gets at its start: what marks a directory as a run's.
RUN_MARKS = ("config.yaml", "metrics.jsonl")


class RunDirError(MoeVaeError):
    """The output directory cannot be used (exists with outputs, or not writable)."""


def check_output_dir(cfg: OutputConfig) -> None:
    """Fail early (before any data is prepared) when output.dir cannot hold run directories:
    its nearest existing ancestor must be a writable directory."""
    out = Path(cfg.dir).expanduser()
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(
            f"output.dir {str(out)!r} cannot hold run directories: {str(existing)!r} is not "
            f"a directory"
        )
    reason = why_not_writable(existing)
    if reason is not None:
        raise RunDirError(
            f"output.dir {str(out)!r} cannot be created: {str(existing)!r} is not writable "
            f"({reason})"
        )


def prepare_run_dir(cfg: OutputConfig, default_name: str = "run") -> Path:
    name = cfg.name or f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.dir).expanduser() / name
    if run_dir.exists() and any(run_dir.iterdir()):
        if not cfg.overwrite:
            raise RunDirError(
                f"run directory {str(run_dir)!r} already holds outputs: choose another "
                f"--output.name or pass --output.overwrite=true"
            )
        if not any((run_dir / mark).exists() for mark in RUN_MARKS):
            # overwrite (or resume=auto with nothing to resume) replaces a run, never a folder
            # of something else that happens to have the name
            raise RunDirError(
                f"{str(run_dir)!r} is not a moe-vae run directory (no {' or '.join(RUN_MARKS)})"
                f" and is not empty; overwriting would delete it: choose another --output.name"
            )
        # A fresh run in place of the old one: its metrics.jsonl is appended to (resume needs
        # that) and its checkpoints would be found by resume=auto, so the old outputs go.
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"cannot create run directory {str(run_dir)!r}: {err.strerror}") from None
    reason = why_not_writable(run_dir)
    if reason is not None:
        raise RunDirError(f"run directory {str(run_dir)!r} is not writable ({reason})")
    return run_dir
