"""Checkpoints that resume exactly: model, optimizer, counters, data position, every RNG.

Written atomically (temporary file, then rename), so `checkpoint.pt` is always complete.
Loaded with `weights_only=True`: only tensors and plain containers, never arbitrary objects.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import yaml
from pydantic import ValidationError

from moe_vae.config.load import config_to_yaml, format_validation_error
from moe_vae.config.schema import Config, ModelConfig
from moe_vae.errors import MoeVaeError


class CheckpointError(MoeVaeError):
    """A missing, unreadable or incompatible checkpoint."""


def rng_state() -> dict[str, Any]:
    np_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    kind, keys, pos, has_gauss, gauss = np_state
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sync_dir(folder: Path) -> None:
    """Makes a rename in `folder` durable (a crash of the machine, not only of the process,
    keeps it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """`state` to `path` atomically and durably: a temporary file, flushed to the disk, then
    renamed. A failed write (a full disk) is one CheckpointError and leaves no temporary
    file; what was at `path` stays."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # else a power cut after the rename may leave it empty
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch's zip writer reports I/O as RuntimeError
        tmp.unlink(missing_ok=True)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise CheckpointError(f"cannot write checkpoint {str(path)!r}: {reason}") from None
    _sync_dir(path.parent)


def save_rotating(run_dir: Path, state: dict[str, Any], step: int, keep: int) -> Path:
    """checkpoints/step-<N>.pt (atomic), then checkpoint.pt -> it (a hard link swapped in by
    rename, so "latest" is never partial), then the oldest beyond `keep` removed."""
    folder = run_dir / "checkpoints"
    folder.mkdir(exist_ok=True)
    path = folder / f"step-{step:09d}.pt"
    save_checkpoint(path, state)
    point_latest_at(run_dir, path)
    for old in sorted(folder.glob("step-*.pt"))[:-keep]:
        old.unlink()
    return path


def auto_resume_path(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory (None: start fresh): checkpoint.pt,
    else the newest kept checkpoints/step-N.pt (a job that died after writing its first one,
    before checkpoint.pt pointed at it, would otherwise start over and delete it)."""
    latest = run_dir / "checkpoint.pt"
    if latest.is_file():
        return latest
    kept = sorted((run_dir / "checkpoints").glob("step-*.pt"))
    return kept[-1] if kept else None


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint belongs to (where a resume writes): its folder, or for
    a kept step checkpoint (`<run>/checkpoints/step-N.pt`, a roll-back) the run's."""
    folder = checkpoint.parent
    return folder.parent if folder.name == "checkpoints" else folder


def point_latest_at(run_dir: Path, path: Path) -> None:
    """checkpoint.pt -> `path` (a hard link swapped in by rename, so never partial)."""
    latest_tmp = run_dir / ".checkpoint.pt.link"
    latest_tmp.unlink(missing_ok=True)
    try:
        os.link(path, latest_tmp)
    except OSError:  # no hard links on this filesystem: a copy, still swapped in atomically
        import shutil

        shutil.copyfile(path, latest_tmp)
    os.replace(latest_tmp, run_dir / "checkpoint.pt")
    _sync_dir(run_dir)


def roll_back_to(checkpoint: Path) -> list[Path]:
    """A resume from a kept `<run>/checkpoints/step-N.pt`: the later kept checkpoints move to
    `checkpoints/rolled-back/` (out of the rotation, which would otherwise prune by name and keep
    them over newer ones) and checkpoint.pt points at step N, so a crash before the next save
    resumes the roll-back, not the abandoned future. Returns the moved files' new paths."""
    folder = checkpoint.parent
    if folder.name != "checkpoints" or not checkpoint.name.startswith("step-"):
        return []
    later = [p for p in sorted(folder.glob("step-*.pt")) if p.name > checkpoint.name]
    moved = []
    if later:
        aside = folder / "rolled-back"
        aside.mkdir(exist_ok=True)
        for p in later:
            moved.append(aside / p.name)
            os.replace(p, moved[-1])
    point_latest_at(folder.parent, checkpoint)
    return moved


# What a resume reads beyond the weights and config (a weights-only file lacks them).
RESUME_KEYS = ("step", "data", "epoch_sums", "epoch_steps", "epochs", "grid_rows", "rng")


def require_resumable(path: Path, state: dict[str, Any]) -> None:
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot resume training: it lacks {', '.join(missing)} "
            "(expected a checkpoint.pt or checkpoints/step-N.pt written by moe-vae train)"
        )


def saved_config(path: Path, text: str) -> Config:
    """The config a checkpoint (or safetensors file) was trained with, validated."""
    try:
        return Config.model_validate(yaml.safe_load(text))
    except ValidationError as err:
        detail = format_validation_error(err)
    except yaml.YAMLError as err:
        detail = str(err)
    raise CheckpointError(f"checkpoint {str(path)!r} has a broken config: {detail}")


# Our .safetensors files' metadata key for the mixing weights (a JSON list, one per expert).
PRIOR_KEY = "expert_prior"


def weights_metadata(
    cfg: Config, image_shape: Sequence[int], prior: list[float] | None
) -> dict[str, str]:
    """The metadata of our .safetensors files (its values are strings): the resolved config,
    the image shape and, where known, the mixing weights `sample --mixture` draws experts from,
    so that a file without the checkpoint samples the mixture as the checkpoint does."""
    metadata = {"config": config_to_yaml(cfg), "image_shape": json.dumps(list(image_shape))}
    if prior is not None:
        metadata[PRIOR_KEY] = json.dumps(prior)
    return metadata


def last_prior(epochs: list[dict[str, Any]]) -> list[float] | None:
    """The mixing weights of a run's epoch records: each expert's share of the manager's
    probability on the training data in the last epoch (experts/importance)."""
    return epochs[-1].get("experts/importance") if epochs else None


# How inputs reach the experts, not what the experts and the manager are: no weight depends on
# them, so a checkpoint may go on under others (say grouped -> batched, to shard the experts).
ROUTING_FIELDS = ("routing", "top_k", "route_noise", "capacity_factor", "expert_gemm")


def check_same_model(path: Path, saved: ModelConfig, wanted: ModelConfig) -> list[str]:
    """One error listing every model setting that differs (a checkpoint of another model);
    routing settings may differ: returned, one line each, for the caller to say."""
    theirs, ours = saved.model_dump(), wanted.model_dump()
    changed = [k for k in theirs if theirs[k] != ours[k]]
    diff = ", ".join(
        f"model.{k}: {theirs[k]!r} in the checkpoint, {ours[k]!r} asked"
        for k in changed
        if k not in ROUTING_FIELDS
    )
    if diff:
        raise CheckpointError(f"checkpoint {str(path)!r} is of another model shape ({diff})")
    return [f"model.{k} {theirs[k]!r} -> {ours[k]!r}" for k in changed]


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint, checked (`mmap`: its tensors mapped, not read: for a look at its config)."""
    path = Path(path)
    if path.parent.name == "rolled-back":
        raise CheckpointError(
            f"checkpoint {str(path)!r} was set aside by a roll-back: move it back into "
            f"{str(path.parent.parent)!r} to resume from it"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found (expected a checkpoint.pt file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or not a moe-vae checkpoint: "
            f"{str(err).splitlines()[0]}"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a moe-vae checkpoint")
    return state
