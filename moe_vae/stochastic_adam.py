"""Adam for weights stored in bf16 (train.precision=bf16-true), rounding stochastically.

Rounded to the nearest bf16, an update smaller than half a bf16 step of its weight (2^-9 to
2^-8 of the weight) is lost every time, and so are Adam's second-moment updates at beta2 =
0.999 (a 0.1 % change). The founding recipe's training loss then stops falling early
(docs/results.md). Rounded up or down with probabilities given by the distance, every
weight and moment is right on average, so small updates add up as in fp32, with the same bf16
storage.

The random bits are not drawn from torch's generator: they are a hash of (seed, step count,
tensor, element), counter-based like Philox. So the step needs no generator state (a resumed
run rounds as the uninterrupted one would, and the optimizer takes nothing from the
generator the model draws its noise from), the compiled step computes the bits inside its
fused loop instead of reading a tensor of them (CPU: the compiled step ~10x faster than
with torch's generator, docs/performance.md), and a CUDA graph records it like any
elementwise kernel.

The step is one function over the lists of weights, gradients and moments, computed in fp32:
eager (a few dozen elementwise passes per tensor), or through torch.compile (train.compile),
which fuses it. Like torch's fused Adam it reads `found_inf` (a device flag): where it is 1
nothing changes, step counts included, with no host sync, so it works under
train.host_sync=log and inside the recorded CUDA graph (its step counts live on the device).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

# bf16 is the upper 16 bits of an fp32: adding a uniform draw to the 16 bits cut off, then
# cutting them, rounds up with probability equal to the fraction they held.
_LOW_BITS = 1 << 16
_HIGH_MASK = -_LOW_BITS  # 0xFFFF0000 as an int32


def _int32(v: int) -> int:
    """A Python int as the int32 with the same low 32 bits (two's complement)."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


# Constants of a 32-bit xor-shift-multiply finaliser with full avalanche (every input bit
# flips each output bit with probability ~1/2); the golden-ratio step spreads stream numbers.
_MUL1, _MUL2, _GOLDEN = _int32(0x7FEB352D), _int32(0x846CA68B), _int32(0x9E3779B9)


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash of int32 tensors, elementwise: the same bits as the
    uint32 arithmetic (multiplies wrap; the masks make int32's arithmetic >> logical)."""
    x = x ^ ((x >> 16) & 0xFFFF)  # a new tensor: the rest updates it in place (fewer buffers)
    x *= _MUL1
    x ^= (x >> 15) & 0x1FFFF
    x *= _MUL2
    x ^= (x >> 16) & 0xFFFF
    return x


def stream_key(step: torch.Tensor, stream: int) -> torch.Tensor:
    """The 0-dim int32 key of one draw: a hash of the step count (a device tensor) and a
    stream number (seed and tensor, fixed per run)."""
    return hash32(hash32(step.to(torch.int32)) ^ _int32(stream * _GOLDEN))


def random_bits(like: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """32 random-looking bits per element of `like` (int32, its shape): hash32(i ^ key) for
    element i, so a new key gives a new, independent-looking draw everywhere. Its low and
    high 16 bits are two draws (the hash's avalanche makes them look independent)."""
    index = torch.arange(like.numel(), dtype=torch.int32, device=like.device)
    return hash32(index ^ key).view(like.shape)


def round_stochastic(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16, rounded away from or towards zero with probability by distance, by the
    low 16 bits of `bits` (int32, x's shape): unbiased when those are uniform. Values already
    representable in bf16 come back unchanged."""
    x_bits = x.float().contiguous().view(torch.int32)
    return ((x_bits + (bits & (_LOW_BITS - 1))) & _HIGH_MASK).view(torch.float32).to(torch.bfloat16)


def adam_step_stochastic(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    streams: list[int],
    found_inf: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One Adam update (torch's algorithm: L2 weight decay, bias-corrected moments), in fp32,
    written back to bf16 stochastically; skipped entirely where found_inf is 1. `streams`:
    one number per tensor: one 32-bit draw of stream 2s rounds its weight (low 16 bits) and
    first moment (high 16 bits), one of stream 2s+1 its second moment."""
    skip = found_inf.bool()
    for p, g, m, v, step, s in zip(
        params, grads, exp_avgs, exp_avg_sqs, steps, streams, strict=True
    ):
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
        bits_pm = random_bits(p, stream_key(step_new, 2 * s))
        bits_v = random_bits(p, stream_key(step_new, 2 * s + 1))
        p.copy_(torch.where(skip, p, round_stochastic(p_new, bits_pm)))
        m.copy_(torch.where(skip, m, round_stochastic(m32, bits_pm >> 16)))
        v.copy_(torch.where(skip, v, round_stochastic(v32, bits_v)))
        step.copy_(step_new)


class StochasticRoundingAdam(torch.optim.Optimizer):
    """Adam over bf16 weights whose moments are bf16 too, every write rounded stochastically.
    `seed`: picks the rounding draws (train.seed); the k-th parameter over all groups rounds
    with stream seed * 2^20 + k, the same for every run with that seed and model.
    `compiled`: the step through torch.compile (one compilation; the lists' shapes are fixed)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        seed: int = 0,
        compiled: bool = False,
    ) -> None:
        # capturable: the step counts are device tensors (what checkpoints and graphs expect)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, capturable=True)
        super().__init__(params, defaults)
        self.found_inf: torch.Tensor | None = None
        params_in_order = [p for group in self.param_groups for p in group["params"]]
        self._stream = {p: (seed << 20) + k for k, p in enumerate(params_in_order)}
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
                [self._stream[p] for p in params],
                found,
                float(group["lr"]),
                float(beta1),
                float(beta2),
                float(group["eps"]),
                float(group["weight_decay"]),
            )
