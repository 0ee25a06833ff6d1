"""The optimizer, built in one place for the plain trainer and the DeepSpeed engine."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from moe_vae.config.schema import OptimConfig
from moe_vae.stochastic_adam import StochasticRoundingAdam


def build_adam(
    params: Iterable[Any],
    cfg: OptimConfig,
    capturable: bool = False,
    stochastic_bf16: bool = False,
    compiled: bool = False,
    seed: int = 0,
) -> torch.optim.Optimizer:
    """Adam with the config's hyper-parameters. `optim.impl` picks torch's implementation (the
    same algorithm): fused (one kernel over all parameters, CPU and CUDA), foreach (a few
    multi-tensor kernels) or loop (one set of kernels per parameter, torch's CPU default).
    `capturable`: its step counts stay on the device, so a CUDA graph can record the step.
    `stochastic_bf16`: bf16 weights written back with stochastic rounding instead (our own
    step, through torch.compile if `compiled`; its step counts always live on the device;
    `seed` picks its rounding draws)."""
    hyper: dict[str, Any] = dict(
        lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    if stochastic_bf16:
        return StochasticRoundingAdam(params, seed=seed, compiled=compiled, **hyper)
    impl: dict[str, Any] = {
        "fused": {"fused": True},
        "foreach": {"foreach": True},
        "loop": {"foreach": False},
    }[cfg.impl]
    return torch.optim.Adam(params, capturable=capturable, **hyper, **impl)


def nonfinite_flag(loss: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """1.0 where the loss or any gradient holds a NaN or inf, else 0.0: a 0-dim float tensor on
    the loss's device, not read back. fp32 gradients go through the multi-tensor check that
    torch's GradScaler uses (one kernel launch for all of them on a GPU, where a sum per
    gradient is one each); its unscale multiplies them by exactly 1. Its CUDA kernel has no
    bf16 (pytorch/pytorch#127176), so bf16 gradients (train.precision=bf16-true) are checked by
    their norms, one multi-tensor kernel too: a NaN or inf anywhere makes its tensor's norm
    non-finite (so would a norm past bf16's range, ~3e38, itself a broken step). The same
    split on every device, so a CPU runs the path a GPU does."""
    found = (~torch.isfinite(loss.detach())).float()
    checked = [g for g in grads if g.dtype != torch.bfloat16]
    by_norm = [g for g in grads if g.dtype == torch.bfloat16]
    if checked:
        torch._amp_foreach_non_finite_check_and_unscale_(checked, found, found.new_ones(()))
    if by_norm:
        norms = torch.stack(torch._foreach_norm(by_norm)).float()
        found = torch.maximum(found, (~torch.isfinite(norms)).any().float())
    return found
