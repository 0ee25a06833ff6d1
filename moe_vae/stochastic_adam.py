"""Adam for weights stored in bf16 (train.precision=bf16-true), rounding stochastically.

Rounded to the nearest bf16, an update smaller than half a bf16 step of its weight (2^-9 to
2^-8 of the weight) is lost every time, and so are Adam's second-moment updates at beta2 =
0.999 (a 0.1 % change). The founding recipe's training loss then stops falling early
(docs/results.md). Rounded up or down with probabilities given by the distance, every
weight and moment is right on average, so small updates add up as in fp32, with the same bf16
storage.

The step is one function over the lists of weights, gradients and moments, computed in fp32:
eager (a dozen elementwise passes per tensor), or through torch.compile (train.compile), which
should fuse it into kernels that move half the bytes of fp32 Adam (not yet measured on a GPU;
on a CPU the random draws dominate either way, docs/performance.md). Like torch's
fused Adam it reads `found_inf` (a device flag): where it is 1 nothing changes, step counts
included, with no host sync, so it works under train.host_sync=log and inside the recorded
CUDA graph (its step counts live on the device).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

# bf16 is the upper 16 bits of an fp32: adding a uniform draw to the 16 bits cut off, then
# cutting them, rounds up with probability equal to the fraction they held.
_LOW_BITS = 1 << 16
_HIGH_MASK = -_LOW_BITS  # 0xFFFF0000 as an int32


def round_stochastic(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, rounded away from or towards zero with probability by distance: unbiased.
    Values already representable in bf16 come back unchanged."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint_like(bits, 0, _LOW_BITS)
    return ((bits + noise) & _HIGH_MASK).view(torch.float32).to(torch.bfloat16)


def adam_step_stochastic(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    found_inf: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One Adam update (torch's algorithm: L2 weight decay, bias-corrected moments), in fp32,
    written back to bf16 stochastically; skipped entirely where found_inf is 1."""
    skip = found_inf.bool()
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        step_new = step + (1.0 - found_inf)
        g32, p32 = g.float(), p.float()
        if weight_decay:
            g32 = g32 + weight_decay * p32
        m32 = m.float() * beta1 + g32 * (1.0 - beta1)
        v32 = v.float() * beta2 + g32 * g32 * (1.0 - beta2)
        # At a skipped first step these divide by 0; torch.where keeps the old values then.
        m_hat = m32 / (1.0 - torch.pow(beta1, step_new))
        v_hat = v32 / (1.0 - torch.pow(beta2, step_new))
        p_new = p32 - lr * m_hat / (v_hat.sqrt() + eps)
        p.copy_(torch.where(skip, p, round_stochastic(p_new)))
        m.copy_(torch.where(skip, m, round_stochastic(m32)))
        v.copy_(torch.where(skip, v, round_stochastic(v32)))
        step.copy_(step_new)


class StochasticRoundingAdam(torch.optim.Optimizer):
    """Adam over bf16 weights whose moments are bf16 too, every write rounded stochastically.
    `compiled`: the step through torch.compile (one compilation; the lists' shapes are fixed)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        compiled: bool = False,
    ) -> None:
        # capturable: the step counts are device tensors (what checkpoints and graphs expect)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, capturable=True)
        super().__init__(params, defaults)
        self.found_inf: torch.Tensor | None = None
        step_fn: Callable[..., None] = adam_step_stochastic
        self._step_fn = torch.compile(step_fn) if compiled else step_fn

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("StochasticRoundingAdam takes no closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if not state:  # the first step: checked and allocated once
                    if p.dtype != torch.bfloat16:
                        raise ValueError(
                            f"StochasticRoundingAdam needs bf16 weights, got {p.dtype}"
                        )
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            found = self.found_inf
            if found is None:
                found = torch.zeros((), dtype=torch.float32, device=params[0].device)
            beta1, beta2 = group["betas"]
            self._step_fn(
                params,
                [p.grad for p in params],
                [self.state[p]["exp_avg"] for p in params],
                [self.state[p]["exp_avg_sq"] for p in params],
                [self.state[p]["step"] for p in params],
                found,
                float(group["lr"]),
                float(beta1),
                float(beta2),
                float(group["eps"]),
                float(group["weight_decay"]),
            )
