"""The non-finite check that gates every update: a NaN or inf in the loss or in any single
gradient element raises the flag, for fp32 gradients (torch's AMP multi-tensor check) and bf16
ones (train.precision=bf16-true: by their norms, as CUDA's AMP kernel has no bf16)."""

from __future__ import annotations

import pytest
import torch

from moe_vae.optim import nonfinite_flag


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
