"""The non-finite check that gates every update: a NaN or inf in the loss or in any single
gradient element raises the flag, for fp32 gradients (torch's AMP multi-tensor check) and bf16
ones (train.precision=bf16-true: by their norms, as CUDA's AMP kernel has no bf16). And the
Adam for bf16 weights: torch's Adam rounded stochastically, unbiased, skipping on found_inf,
its random bits a hash of (seed, step, tensor, element)."""

from __future__ import annotations

import pytest
import torch

from moe_vae.optim import nonfinite_flag
from moe_vae.stochastic_adam import (
    StochasticRoundingAdam,
    hash32,
    random_bits,
    round_stochastic,
    stream_key,
)


def _grads(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen).to(dtype) for shape in [(3, 4), (5,), (2, 2, 2)]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_bad_gradient_element_raises_the_flag(dtype, bad):
    loss = torch.tensor(1.5)
    grads = _grads(dtype)
    before = [g.clone() for g in grads]
    assert nonfinite_flag(loss, grads).item() == 0.0
    assert all(torch.equal(g, b) for g, b in zip(grads, before, strict=True))  # untouched
    grads[1][3] = bad
    flag = nonfinite_flag(loss, grads)
    assert flag.dtype == torch.float32 and flag.dim() == 0
    assert flag.item() == 1.0


def test_mixed_dtypes_and_a_bad_loss():
    grads = _grads(torch.float32) + _grads(torch.bfloat16)
    assert nonfinite_flag(torch.tensor(2.0), grads).item() == 0.0
    assert nonfinite_flag(torch.tensor(float("nan")), grads).item() == 1.0
    grads[-1][0, 1, 1] = float("inf")  # the bf16 half only
    assert nonfinite_flag(torch.tensor(2.0), grads).item() == 1.0
    assert nonfinite_flag(torch.tensor(2.0), []).item() == 0.0


def _hash32_reference(v: int) -> int:
    """The finaliser in plain unsigned 32-bit arithmetic (Python ints, masked)."""
    v ^= v >> 16
    v = (v * 0x7FEB352D) & 0xFFFFFFFF
    v ^= v >> 15
    v = (v * 0x846CA68B) & 0xFFFFFFFF
    return v ^ (v >> 16)


def test_hash32_is_the_unsigned_arithmetic_and_spreads_bits():
    """int32 tensor arithmetic (wrapping multiplies, masked arithmetic shifts) gives the
    uint32 hash's bits, for negative int32s too; its low 16 bits (the rounding draw) are
    uniform over consecutive inputs."""
    values = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0x9E3779B9]
    signed = [v - 2**32 if v >= 2**31 else v for v in values]
    got = hash32(torch.tensor(signed, dtype=torch.int32)).tolist()
    assert [g & 0xFFFFFFFF for g in got] == [_hash32_reference(v) for v in values]
    low = (hash32(torch.arange(1 << 16, dtype=torch.int32)) & 0xFFFF).float()
    counts = torch.histc(low, bins=16, min=0, max=65536)
    assert (counts - 4096).abs().max() < 4 * 64  # 4 sigma of a uniform count
    assert len(set(hash32(torch.arange(1000, dtype=torch.int32)).tolist())) == 1000  # bijective


@pytest.mark.timeout(300)
def test_compiled_hash_wraps_as_eager_does():
    """Inductor's C++ is built without -fwrapv, so its int32 multiplies overflowing would be
    undefined behaviour in scalar code: check its vector loop and its remainder (an odd
    length) give eager's bits."""
    torch._dynamo.reset()
    x = torch.randn(1001)
    key = stream_key(torch.tensor(3.0), 11)
    compiled = torch.compile(random_bits)(x, key)
    torch._dynamo.reset()
    assert torch.equal(compiled, random_bits(x, key))


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    x = torch.tensor([1.0 + 2**-9, -(3.0 + 2**-8), 0.1, 1e-30])  # between two bf16 values
    bits = [random_bits(x, stream_key(torch.tensor(float(step)), 7)) for step in range(20000)]
    draws = torch.stack([round_stochastic(x, b) for b in bits]).float()
    high = torch.stack([round_stochastic(x, b >> 16) for b in bits]).float()  # moment's draw
    torch.testing.assert_close(high.mean(0), x, rtol=2e-4, atol=0)
    assert (high != draws).float().mean() > 0.2  # not the same draw
    down = x.to(torch.bfloat16).float()  # ... and the values either side
    for i in range(len(x)):
        assert set(draws[:, i].unique().tolist()) <= {v.item() for v in _neighbours(x[i])}, draws[
            :, i
        ].unique()
    torch.testing.assert_close(draws.mean(0), x, rtol=2e-4, atol=0)
    exact = torch.tensor([1.0, -0.5, 0.0, 3.0]).to(torch.bfloat16).float()
    assert torch.equal(round_stochastic(exact, bits[0]).float(), exact)
    assert not torch.equal(draws.mean(0), down)  # nearest rounding would be biased here


def _neighbours(x: torch.Tensor) -> list[torch.Tensor]:
    """The bf16 values just below and above |x| (with its sign)."""
    bits = x.view(torch.int32) & -65536
    lo = bits.view(torch.float32)
    hi = (bits + 65536).view(torch.float32)
    return [lo, hi]


def _adam_pair(weight_decay: float = 0.0):
    """The same bf16 weights and gradient for torch's Adam (in fp32) and ours (in bf16)."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 32, generator=gen).to(torch.bfloat16)
    g = torch.randn(64, 32, generator=gen).to(torch.bfloat16)
    ref = torch.nn.Parameter(w.float())
    ours = torch.nn.Parameter(w.clone())
    ref.grad, ours.grad = g.float(), g.clone()
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    return ref, torch.optim.Adam([ref], **kw), ours, StochasticRoundingAdam([ours], **kw)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_stochastic_adam_is_torch_adam_rounded(weight_decay):
    """Each step lands on one of the two bf16 neighbours of torch's fp32 Adam result."""
    ref, ref_opt, ours, opt = _adam_pair(weight_decay)
    for _ in range(3):
        ref_opt.step()
        opt.step()
        lo = ref.detach().to(torch.bfloat16).float()
        ulp = lo.abs() * 2**-7
        assert ((ours.float() - ref.detach()).abs() <= ulp).all()
        ref.data.copy_(ours.float())  # both go on from our rounded weights
        st, rs = opt.state[ours], ref_opt.state[ref]
        rs["exp_avg"].copy_(st["exp_avg"].float())
        rs["exp_avg_sq"].copy_(st["exp_avg_sq"].float())
    assert opt.state[ours]["step"].item() == 3
    assert opt.state[ours]["exp_avg"].dtype == torch.bfloat16


def test_stochastic_adam_skips_on_found_inf_and_keeps_small_updates():
    _, _, ours, opt = _adam_pair()
    before = ours.detach().clone()
    opt.found_inf = torch.ones(())
    opt.step()  # skipped before any state: everything at its start
    assert torch.equal(ours, before) and opt.state[ours]["step"].item() == 0
    assert not opt.state[ours]["exp_avg"].any()
    opt.found_inf = torch.zeros(())
    opt.step()
    assert not torch.equal(ours, before) and opt.state[ours]["step"].item() == 1

    # Updates of 1e-4 on weights of 1.0 (a bf16 step there is 2^-7): nearest rounding keeps
    # every weight at 1.0, stochastic rounding moves them by 1000 x 1e-4 on average.
    torch.manual_seed(0)
    moved = {}
    for name, cls in [("nearest", torch.optim.Adam), ("stochastic", StochasticRoundingAdam)]:
        w = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        o = cls([w], lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        for _ in range(1000):
            w.grad = torch.ones_like(w)  # Adam's step is then lr in size
            o.step()
        moved[name] = (1.0 - w.float()).mean().item()
    assert moved["nearest"] == 0.0
    assert moved["stochastic"] == pytest.approx(0.1, rel=0.05)


@pytest.mark.timeout(300)
def test_compiled_stochastic_step_matches_eager():
    """The step as train.compile runs it (inductor fuses the hash into its loop) writes the
    same bf16 weights and moments as the eager step, whatever torch's generator holds."""
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        _, _, ours, opt = _adam_pair(weight_decay=0.1)
        opt = StochasticRoundingAdam([ours], 1e-2, (0.9, 0.999), 1e-8, 0.1, compiled=compiled)
        torch.manual_seed(int(compiled))  # different generator states: not read
        for _ in range(3):
            opt.step()
        st = opt.state[ours]
        results.append([ours.detach().clone(), st["exp_avg"].clone(), st["exp_avg_sq"].clone()])
    torch._dynamo.reset()
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.timeout(300)
def test_bf16_adam_benchmark_prints_every_row():
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bf16_adam.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--params", "5000", "--tensors", "3", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = re.findall(r"^(\S.*?)\s+([\d.]+)\s+([\d.]+)x$", proc.stdout, re.M)
    assert [r[0] for r in rows] == [
        "fused fp32",
        "fused bf16 (nearest)",
        "stochastic bf16, eager",
        "stochastic bf16, compiled",
    ]
    assert rows[0][2] == "1.00" and all(float(ms) > 0 for _, ms, _ in rows)


def _run_stochastic(seed: int, steps: int, split_at: int | None = None) -> list[torch.Tensor]:
    """`steps` steps on two bf16 tensors; with split_at, the optimizer is rebuilt from its
    state_dict there (a resume) and torch's generator is disturbed."""
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(300, generator=gen).bfloat16()) for _ in range(2)]
    grads = [[torch.randn(300, generator=gen).bfloat16() for _ in params] for _ in range(steps)]
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, seed=seed)
    opt = StochasticRoundingAdam(params, **kw)
    for i in range(steps):
        if i == split_at:
            saved = opt.state_dict()
            torch.manual_seed(99)
            torch.rand(1000)
            opt = StochasticRoundingAdam(params, **kw)
            opt.load_state_dict(saved)
        for p, g in zip(params, grads[i], strict=True):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params]


def test_rounding_draws_depend_on_seed_step_and_tensor_only():
    """A resumed optimizer rounds as the uninterrupted one did (no generator state to save);
    another seed rounds differently; two tensors with the same values round differently."""
    whole = _run_stochastic(seed=0, steps=6)
    resumed = _run_stochastic(seed=0, steps=6, split_at=3)
    assert all(torch.equal(a, b) for a, b in zip(whole, resumed, strict=True))
    other = _run_stochastic(seed=1, steps=6)
    assert not all(torch.equal(a, b) for a, b in zip(whole, other, strict=True))
    x = torch.full((4096,), 1.0 + 2**-9)
    step = torch.tensor(1.0)
    a, b = (round_stochastic(x, random_bits(x, stream_key(step, s))) for s in (0, 2))
    assert not torch.equal(a, b)
    assert abs((a.float() == 1.0).float().mean().item() - 0.75) < 0.05  # 1/4 of the way up
