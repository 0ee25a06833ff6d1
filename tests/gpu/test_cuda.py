"""The fast path on a CUDA GPU: skipped where there is none (CI). Their CPU counterparts are
tests/integration/test_fast_path.py and tests/unit/test_host_sync.py; these check what only a
GPU has: CUDA graphs, the device-side sync rule, the bf16 grouped GEMM kernel.
Run them on a GPU machine with `pytest tests/gpu`."""

from __future__ import annotations

import pytest
import torch
import torch._inductor.config

from moe_vae.config import load_config
from moe_vae.evaluate.evaluator import to_inputs
from moe_vae.train.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SWITCHES = {
    "dense": [],
    "fused-input": ["--model.fused_input=true"],
    "topk": ["--model.routing=topk", "--model.top_k=2"],
    "topk-grouped": ["--model.routing=topk", "--model.top_k=2", "--model.expert_gemm=grouped"],
}
CUDA = "--train.device=cuda"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# The two ways to CUDA graphs: torch.compile's (forward and backward), and ours (the whole
# step, here over a compiled forward).
GRAPHS = {
    "reduce-overhead": ["--train.compile=reduce-overhead"],
    "whole-step": ["--train.cuda_graph=true", "--train.compile=default"],
    "whole-step-eager": ["--train.cuda_graph=true"],
}


@pytest.mark.parametrize("graphs", GRAPHS)
@pytest.mark.parametrize("switch", SWITCHES)
def test_cuda_graph_step_matches_eager(train_steps, switch, graphs):
    """12 steps: the whole-step graph warms up for 3, records the 4th, replays the rest, and
    the tiny config's epoch ends at 10 (evaluation between replays)."""
    extra = SWITCHES[switch]
    eager, w_eager = train_steps(f"eager-{switch}", CUDA, *extra, steps=12)
    with torch._inductor.config.patch(fallback_random=True):  # eager's noise
        graphed, w_graphed = train_steps(
            f"graphed-{switch}",
            CUDA,
            *extra,
            *GRAPHS[graphs],
            "--train.host_sync=log",
            steps=12,
        )
    # Different kernels (and, grouped, bf16 both ways with different rounding).
    rel = 1e-2 if "grouped" in switch else 1e-3
    assert len(eager) == 12
    assert graphed == pytest.approx(eager, rel=rel)
    for name, w in w_eager.items():
        torch.testing.assert_close(w_graphed[name], w, rtol=1e-2, atol=1e-2, msg=name)


@pytest.mark.parametrize("switch", SWITCHES)
def test_deferred_step_never_waits_for_the_host(tmp_path, monkeypatch, repo, switch):
    """CUDA's sync debug mode raises at any call that waits for the device."""
    monkeypatch.chdir(repo)
    cfg = load_config(
        "configs/tiny.yaml",
        [f"--output.dir={tmp_path}", CUDA, "--train.host_sync=log", "--track.wandb=disabled"]
        + SWITCHES[switch],
    )
    trainer = Trainer(cfg, quiet=True)
    x_BD = to_inputs(next(trainer.data.train.epoch_batches(1)).images.to("cuda"))
    trainer.train_step(x_BD)  # Adam's state is allocated on the first step
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            terms, _, _ = trainer.train_step(x_BD)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(terms.total).item()


def test_bf16_autocast_on_cuda(train_steps):
    fp32, _ = train_steps("fp32", CUDA)
    bf16, _ = train_steps("bf16", CUDA, "--train.precision=bf16")
    assert bf16 != fp32
    assert bf16 == pytest.approx(fp32, rel=2e-2)


def test_grouped_gemm_matches_batched_on_cuda(train_steps):
    topk = SWITCHES["topk"]
    batched, _ = train_steps("batched", CUDA, *topk, "--model.expert_gemm=batched")
    grouped, _ = train_steps("grouped", CUDA, *topk, "--model.expert_gemm=grouped")
    assert grouped == pytest.approx(batched, rel=2e-2)  # the grouped kernel runs in bf16


def test_whole_step_graph_is_recorded_and_replayed(tmp_path, monkeypatch, repo):
    monkeypatch.chdir(repo)
    cfg = load_config(
        "configs/tiny.yaml",
        [
            f"--output.dir={tmp_path}",
            CUDA,
            "--train.host_sync=log",
            "--train.cuda_graph=true",
            "--train.max_steps=8",
            "--track.wandb=disabled",
        ],
    )
    trainer = Trainer(cfg, quiet=True)
    trainer.fit()
    assert trainer.step_graph is not None and trainer.step_graph.graph is not None
    assert trainer.step_graph.eager_calls == 3  # then recorded at step 4, replayed to step 8
