"""The GPU fast path's switches, checked on a CPU against the plain step.

train.compile: the compiled step (what reduce-overhead turns into CUDA graphs on a GPU) computes
the same losses and weights as the eager step. Compiled, the grouped GEMM runs in bf16 (what it
does on a GPU), so that case is compared at bf16's tolerance. train.precision=bf16 in one
process: autocast, close to fp32."""

from __future__ import annotations

import pytest
import torch
import torch._inductor.config

from moe_vae.config import load_config
from moe_vae.errors import MoeVaeError
from moe_vae.track.jsonl import step_values
from moe_vae.train.trainer import Trainer


def _four_steps(tmp_path, name: str, *extra: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Four logged steps of the tiny config: (losses, final weights)."""
    cfg = load_config(
        "configs/tiny.yaml",
        [
            f"--output.dir={tmp_path}",
            f"--output.name={name}",
            "--train.max_steps=4",
            "--train.log_every=1",
            *extra,
        ],
    )
    trainer = Trainer(cfg, quiet=True)
    result = trainer.fit()
    values = step_values(result.run_dir / "metrics.jsonl")
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return [values[step] for step in sorted(values)], weights


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled frames shared with other tests (the model's) would be recompiled with dynamic
    shapes, which inductor's eager-random fallback cannot draw: start from a clean cache."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "routing,gemm,fused",
    [
        ("dense", "batched", False),
        ("dense", "batched", True),
        ("topk", "batched", False),
        ("topk", "grouped", False),
    ],
)
def test_compiled_step_matches_eager(tmp_path, monkeypatch, repo, routing, gemm, fused):
    monkeypatch.chdir(repo)

    def losses(mode: str) -> tuple[list[float], dict[str, torch.Tensor]]:
        return _four_steps(
            tmp_path,
            f"{mode}-{routing}-{gemm}-{fused}",
            f"--model.routing={routing}",
            f"--model.expert_gemm={gemm}",
            f"--model.fused_input={str(fused).lower()}",
            f"--train.compile={mode}",
        )

    eager, w_eager = losses("none")
    # Inductor draws its own random numbers unless told to use eager's: same noise, same math.
    with torch._inductor.config.patch(fallback_random=True):
        compiled, w_compiled = losses("default")
    # Batched: fp32 both ways. Grouped: bf16 compiled, and Adam moves a weight by ~lr whatever
    # its gradient's size, so rounding can flip small ones: 4 steps of lr 1e-3 bound the gap.
    # (tests/unit/test_grouped.py compares the compiled bf16 gradients themselves.)
    rel, atol = (1e-4, 1e-4) if gemm == "batched" else (1e-2, 8e-3)
    assert len(eager) == 4
    assert compiled == pytest.approx(eager, rel=rel)
    for name, w in w_eager.items():
        torch.testing.assert_close(w_compiled[name], w, rtol=1e-3, atol=atol, msg=name)


def test_bf16_autocast_in_one_process(tmp_path, monkeypatch, repo):
    monkeypatch.chdir(repo)
    fp32, w32 = _four_steps(tmp_path, "fp32")
    bf16, w16 = _four_steps(tmp_path, "bf16", "--train.precision=bf16")
    assert bf16 != fp32  # the matmuls really ran in bf16
    assert bf16 == pytest.approx(fp32, rel=2e-2)
    for name, w in w32.items():
        assert w16[name].dtype == torch.float32, name  # fp32 weights: Adam updates them
        torch.testing.assert_close(w16[name], w, rtol=0, atol=8e-3, msg=name)  # 4 steps of lr


def test_fp16_needs_deepspeed(tmp_path, monkeypatch, repo):
    monkeypatch.chdir(repo)
    with pytest.raises(MoeVaeError, match="fp16 needs loss scaling"):
        _four_steps(tmp_path, "fp16", "--train.precision=fp16")
