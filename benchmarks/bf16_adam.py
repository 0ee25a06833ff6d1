"""Time one Adam step over N parameters four ways: torch's fused Adam on fp32 weights, the same
on bf16 weights (rounding to nearest), and moe-vae's stochastic-rounding Adam on bf16 weights,
eager and compiled. The optimizer's step is what bounds top-1 routing over many experts
(docs/performance.md), so this isolates it.

    python benchmarks/bf16_adam.py [--params 26963072] [--tensors 12] [--steps 20] [--device cpu]

Prints ms per step and the ratio to fused fp32 Adam.
"""

from __future__ import annotations

import argparse
import time

import torch

from moe_vae.stochastic_adam import StochasticRoundingAdam


def _params(n: int, tensors: int, dtype: torch.dtype, device: str) -> list[torch.nn.Parameter]:
    """`tensors` parameters of about n / tensors elements each, with gradients."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for size in [n // tensors] * (tensors - 1) + [n - (n // tensors) * (tensors - 1)]:
        p = torch.nn.Parameter(torch.randn(size, generator=gen).to(device, dtype))
        p.grad = torch.randn(size, generator=gen).to(device, dtype)
        out.append(p)
    return out


def _time(opt: torch.optim.Optimizer, steps: int, device: str) -> float:
    """Median ms per step over `steps` steps, after 3 of warm-up (state, compilation)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        opt.step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=int, default=26_963_072, help="default: 1024 many_experts")
    ap.add_argument("--tensors", type=int, default=12)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    n, t, dev = args.params, args.tensors, args.device
    rows = [
        (
            "fused fp32",
            lambda: torch.optim.Adam(_params(n, t, torch.float32, dev), fused=True, **kw),
        ),
        (
            "fused bf16 (nearest)",
            lambda: torch.optim.Adam(_params(n, t, torch.bfloat16, dev), fused=True, **kw),
        ),
        (
            "stochastic bf16, eager",
            lambda: StochasticRoundingAdam(_params(n, t, torch.bfloat16, dev), **kw),
        ),
        (
            "stochastic bf16, compiled",
            lambda: StochasticRoundingAdam(_params(n, t, torch.bfloat16, dev), compiled=True, **kw),
        ),
    ]
    print(f"device: {dev}; {n:,} parameters in {t} tensors; median of {args.steps} steps")
    print(f"{'':28}{'ms/step':>10}{'vs fp32':>10}")
    base = None
    for name, build in rows:
        ms = _time(build(), args.steps, dev)
        base = base or ms
        print(f"{name:28}{ms:10.2f}{base / ms:9.2f}x")


if __name__ == "__main__":
    main()
