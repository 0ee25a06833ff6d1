"""Load a trained mixture on one process (CPU or one GPU), without DeepSpeed.

Accepts a run directory, its checkpoint.pt, or a model.safetensors (ours carry the resolved
config, image shape and mixing weights in their metadata). Every problem is a CheckpointError
naming the file.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from moe_vae.config.schema import Config
from moe_vae.errors import MoeVaeError
from moe_vae.model.grouped import check_grouped_device
from moe_vae.model.mixture import MixtureOfVAEs
from moe_vae.train.checkpoint import (
    PRIOR_KEY,
    CheckpointError,
    check_same_model,
    last_prior,
    load_checkpoint,
    saved_config,
)


def _resolve(path: Path) -> Path:
    if path.is_dir():
        for name in ("checkpoint.pt", "model.safetensors"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(
            f"run directory {str(path)!r} has no checkpoint.pt or model.safetensors"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    return path


def _safetensors(
    path: Path, with_weights: bool = True
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A .safetensors file's metadata and (`with_weights`) its tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()} if with_weights else {}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file: {err}") from None
    return meta, weights


def _read(path: Path) -> tuple[dict[str, torch.Tensor], str, list[int]]:
    if path.suffix == ".safetensors":
        meta, weights = _safetensors(path)
        if "config" not in meta:
            raise CheckpointError(f"{str(path)!r} has no moe-vae config in its metadata")
        return weights, meta["config"], json.loads(meta.get("image_shape", "[1, 28, 28]"))
    ckpt = load_checkpoint(path)
    return ckpt["model"], ckpt["config"], ckpt.get("image_shape", [1, 28, 28])


def _layout_for(cfg: Config, device: str) -> Config:
    """The config to evaluate with on `device`: a grouped-GEMM model with more experts than
    CUDA's grouped kernel takes (trained on a CPU, say) runs in the batched layout there, which
    holds the same weights and computes the same losses."""
    if cfg.model.expert_gemm != "grouped":
        return cfg
    try:
        check_grouped_device(cfg.model.num_experts, torch.device(device))
    except MoeVaeError as err:
        warnings.warn(f"{err}; evaluating in the batched layout instead", stacklevel=3)
        model = cfg.model.model_copy(update={"expert_gemm": "batched"})
        return cfg.model_copy(update={"model": model})
    return cfg


def stored_prior(path: str | Path) -> list[float] | None:
    """The mixing weights kept with a trained mixture (a checkpoint's last epoch record, or our
    .safetensors metadata); None where there are none (an export made before they were kept)."""
    file = _resolve(Path(path))
    if file.suffix != ".safetensors":
        return last_prior(load_checkpoint(file, mmap=True).get("epochs") or [])
    text = _safetensors(file, with_weights=False)[0].get(PRIOR_KEY)
    if text is None:
        return None
    try:
        prior = json.loads(text)
    except json.JSONDecodeError:
        prior = None
    if not isinstance(prior, list) or not all(isinstance(p, int | float) for p in prior):
        raise CheckpointError(
            f"{str(file)!r}: its {PRIOR_KEY} metadata {text[:60]!r} is not a JSON list of "
            "one weight per expert"
        )
    return prior


def load_trained(
    path: str | Path, expect: Config | None = None, device: str = "cpu"
) -> tuple[MixtureOfVAEs, Config]:
    """The model (eval mode, all experts) and the config it was trained with.

    With `expect`, its model section must match the checkpoint's (a clear error otherwise)."""
    file = _resolve(Path(path))
    weights, config_yaml, shape = _read(file)
    cfg = saved_config(file, config_yaml)
    if expect is not None:
        check_same_model(file, cfg.model, expect.model)
    model = MixtureOfVAEs(_layout_for(cfg, device).model, tuple(shape))  # type: ignore[arg-type]
    # In the dtype the weights were trained in (bf16 under train.precision=bf16-true), so that
    # an evaluation here computes what the trainer's own did.
    stored = {w.dtype for w in weights.values() if w.is_floating_point()}
    if len(stored) == 1:
        model.to(stored.pop())
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint {str(file)!r} does not fit its own config: {str(err).splitlines()[0]}"
        ) from None
    return model.to(device).eval(), cfg
