"""DeepSpeed's fp16 loss scaler, as the trainer sees it: its scale, and its state in checkpoints.

Under fp16 the loss is multiplied by a scale before backward; a gradient that overflows fp16 makes
DeepSpeed skip the step and halve the scale, and a run of good steps raises it again. Those skips
are the scaler finding its level, not a broken step, and where it stood is part of the state
to resume: from the initial scale a resumed run would overflow (and skip) all over again.
"""

from __future__ import annotations

from typing import Any

import torch

# The scaler's moving parts (the rest is its configuration, rebuilt from the knobs).
SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def scaler_of(optim: Any) -> Any | None:
    """The object holding the scale: FP16_UnfusedOptimizer's loss_scale_config (ZeRO 0), ZeRO
    1/2's loss_scaler. None when the optimizer does not scale (fp32, bf16)."""
    # FP16_UnfusedOptimizer wraps bf16 too (scale fixed at 1): its low_precision_dtype tells.
    dtype = getattr(optim, "low_precision_dtype", None) or getattr(optim, "dtype", None)
    if dtype != torch.float16:
        return None
    return getattr(optim, "loss_scale_config", None) or getattr(optim, "loss_scaler", None)


def loss_scale(optim: Any) -> float | None:
    scaler = scaler_of(optim)
    return float(scaler.cur_scale) if scaler is not None else None


def scaler_state(optim: Any) -> dict[str, Any] | None:
    scaler = scaler_of(optim)
    if scaler is None:
        return None
    return {k: getattr(scaler, k) for k in SCALER_FIELDS if hasattr(scaler, k)}


def load_scaler_state(optim: Any, state: dict[str, Any] | None) -> None:
    """Put a saved scaler state back (nothing when either side has none: a checkpoint of an
    fp32/bf16 run resumed under fp16 starts from the configured initial scale)."""
    scaler = scaler_of(optim)
    if scaler is None or not state:
        return
    for key, value in state.items():
        if key in SCALER_FIELDS and hasattr(scaler, key):
            setattr(scaler, key, value)


def absorbs_overflow(optim: Any) -> bool:
    """Whether an overflowing step now is the scaler's to absorb: fp16 with a dynamic scale
    still above its minimum (at the minimum, a gradient that still overflows is broken)."""
    scaler = scaler_of(optim)
    # A static scale (the JSON's fp16.loss_scale) never moves: its overflows are failures.
    if scaler is None or not (
        getattr(scaler, "dynamic", False) or getattr(scaler, "dynamic_loss_scale", False)
    ):
        return False
    floor = getattr(scaler, "min_loss_scale", None) or getattr(scaler, "min_scale", 1.0)
    return bool(scaler.cur_scale > floor)


def keep_running_at_the_floor(optim: Any) -> None:
    """DeepSpeed's dynamic scaler raises a bare Exception when it overflows at its minimum
    scale. Off: the step is skipped like any non-finite one, so train.max_nonfinite_in_row
    stops the run with the last good state saved, as in fp32 and bf16."""
    scaler = scaler_of(optim)
    if scaler is not None and hasattr(scaler, "raise_error_at_min_scale"):
        scaler.raise_error_at_min_scale = False
