"""The DeepSpeed engine: the only place deepspeed.initialize is called.

Each value has one owner. The DeepSpeed JSON file holds engine knobs only (ZeRO stage, buckets,
fp16's loss scaling); batch size, learning rate and optimizer, precision and clipping come from
our config and are written into the DeepSpeed dict here. A JSON file that sets one of those is
rejected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from moe_vae.config.schema import Config
from moe_vae.errors import MoeVaeError
from moe_vae.optim import build_adam
from moe_vae.parallel.loss_scale import keep_running_at_the_floor
from moe_vae.parallel.sharding import check_checkpointable

# DeepSpeed key -> the key of our config that owns it.
OWNED_BY_US = {
    "train_batch_size": "train.batch_size",
    "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "train.batch_size",
    "optimizer": "optim.*",
    "scheduler": "optim.*",
    "gradient_clipping": "optim.grad_clip",
    "bfloat16": "train.precision",  # DeepSpeed's other name for the bf16 section
}
# Precision sections: whether one is on belongs to train.precision; their other keys are engine
# knobs (fp16's loss scaling: initial_scale_power, loss_scale_window, hysteresis, ...).
PRECISION_SECTIONS = ("fp16", "bf16")


def load_knobs(path: str | None) -> dict[str, Any]:
    """Engine knobs from a DeepSpeed JSON file (null: ZeRO stage 0), checked."""
    if path is None:
        return {"zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
    try:
        knobs = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MoeVaeError(f"parallel.deepspeed_config {path!r} not found") from None
    except (OSError, UnicodeDecodeError) as err:  # a directory, no permission, not text
        raise MoeVaeError(
            f"parallel.deepspeed_config {path!r} cannot be read as a JSON file: {err}"
        ) from None
    except ValueError as err:
        raise MoeVaeError(f"parallel.deepspeed_config {path!r} is not valid JSON: {err}") from None
    if not isinstance(knobs, dict):
        raise MoeVaeError(f"parallel.deepspeed_config {path!r} must hold a JSON object")
    if not isinstance(knobs.get("zero_optimization", {}), dict):
        raise MoeVaeError(
            f"parallel.deepspeed_config {path!r}: zero_optimization must be an object "
            '(e.g. {"stage": 1})'
        )
    for section in PRECISION_SECTIONS:
        if not isinstance(knobs.get(section, {}), dict):
            raise MoeVaeError(
                f"parallel.deepspeed_config {path!r}: {section} must be an object of engine "
                f"knobs (e.g. loss scaling); whether it is on is set by train.precision"
            )
    owned = sorted(k for k in knobs if k in OWNED_BY_US)
    owned += [f"{k}.enabled" for k in PRECISION_SECTIONS if "enabled" in knobs.get(k, {})]
    if owned:
        raise MoeVaeError(
            f"parallel.deepspeed_config {path!r} sets "
            + ", ".join(f"{k} (owned by {OWNED_BY_US.get(k, 'train.precision')})" for k in owned)
            + ": remove them from the JSON and set them in the moe-vae config"
        )
    stage = knobs.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise MoeVaeError(
            f"parallel.deepspeed_config {path!r}: ZeRO stage {stage} is not supported; "
            f"use 0, 1 or 2 (stage 3 would partition the expert shards' weights themselves)"
        )
    return knobs


def check_batch_split(batch_size: int, world_size: int) -> None:
    if batch_size % world_size:
        raise MoeVaeError(
            f"train.batch_size={batch_size} (global) must divide evenly over {world_size} processes"
        )


def deepspeed_dict(cfg: Config, world_size: int, knobs: dict[str, Any]) -> dict[str, Any]:
    if cfg.train.precision == "bf16-true":
        raise MoeVaeError(
            "train.precision=bf16-true is for one process (the plain engine); under DeepSpeed "
            "use train.precision=bf16 (bf16 compute, fp32 master weights in its optimizer)"
        )
    check_batch_split(cfg.train.batch_size, world_size)
    ds = dict(knobs)
    ds.update(
        train_batch_size=cfg.train.batch_size,
        train_micro_batch_size_per_gpu=cfg.train.batch_size // world_size,
        gradient_accumulation_steps=1,
    )
    # Always written: DeepSpeed's own default clips the gradient norm to 1.0, silently. Under
    # ZeRO 0 its norm is wrong with expert shards (the mean of the ranks' norms; its bf16
    # optimizer there leaves expert gradients out): the trainer clips (Parallel.clip_grad_norm).
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    ds["gradient_clipping"] = cfg.optim.grad_clip if stage > 0 else 0.0
    for section in PRECISION_SECTIONS:
        if section in ds and section != cfg.train.precision:
            raise MoeVaeError(
                f"parallel.deepspeed_config sets {section} knobs, but train.precision="
                f"{cfg.train.precision}: set train.precision={section} or remove the section"
            )
    if cfg.train.precision == "fp16" and stage == 0:
        raise MoeVaeError(
            "train.precision=fp16 under ZeRO stage 0: DeepSpeed's engine.backward does not "
            "scale the loss there while its fp16 optimizer unscales the gradients "
            "(deepspeedai/DeepSpeed#8393, open), so every update would be loss-scale times too "
            "small; use ZeRO 1 or 2 (configs/deepspeed/zero1.json) or train.precision=bf16"
        )
    if cfg.train.precision != "fp32":
        ds[cfg.train.precision] = {**ds.get(cfg.train.precision, {}), "enabled": True}
    return ds


def build_engine(model: nn.Module, cfg: Config, world_size: int) -> Any:
    """Adam over all parameters, expert parameters in DeepSpeed's MoE param groups."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    if cfg.train.precision == "fp16" and not get_accelerator().is_fp16_supported():
        raise MoeVaeError(
            f"train.precision=fp16: DeepSpeed's {get_accelerator().device_name()} accelerator "
            "has no fp16 here (a GPU has); use fp32 or bf16"
        )
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "parameters"}
    )
    optimizer = build_adam(groups, cfg.optim)
    ds = deepspeed_dict(cfg, world_size, load_knobs(cfg.parallel.deepspeed_config))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    check_checkpointable(engine.optimizer)
    keep_running_at_the_floor(engine.optimizer)
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    # BF16_Optimizer computes the global norm at every step and skips a non-finite one itself.
    if engine.zero_optimization_stage() > 0 and not isinstance(engine.optimizer, BF16_Optimizer):
        # In fp32, ZeRO 1/2 skips a non-finite gradient only when clipping computes the norm; the
        # overflow check (one all-reduce of a flag) makes the skip unconditional, on every rank.
        if not hasattr(engine.optimizer, "check_grad_overflow"):  # setting it would do nothing
            raise MoeVaeError(
                f"DeepSpeed {deepspeed.__version__}'s ZeRO optimizer has no check_grad_overflow "
                "(0.17.1 added it): non-finite steps would not be skipped; upgrade deepspeed"
            )
        engine.optimizer.check_grad_overflow = True
    return engine
