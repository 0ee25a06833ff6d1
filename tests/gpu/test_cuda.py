"""The fast path on a CUDA GPU: skipped where there is none (CI). Their CPU counterparts are
tests/integration/test_fast_path.py and tests/unit/test_host_sync.py; these check what only a
GPU has: CUDA graphs, the device-side sync rule, the bf16 grouped GEMM kernel.
Run them on a GPU machine with `pytest tests/gpu`."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._inductor.config

from moe_vae.config import load_config
from moe_vae.config.schema import LossConfig, ModelConfig
from moe_vae.evaluate.evaluator import to_inputs
from moe_vae.evaluate.load import load_trained
from moe_vae.model.losses import objective
from moe_vae.model.mixture import MixtureOfVAEs
from moe_vae.track.jsonl import step_values
from moe_vae.train.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SWITCHES = {
    "dense": [],
    "fused-input": ["--model.fused_input=true"],
    "topk": ["--model.routing=topk", "--model.top_k=2"],
    "topk-grouped": ["--model.routing=topk", "--model.top_k=2", "--model.expert_gemm=grouped"],
    "topk-gumbel": ["--model.routing=topk", "--model.route_noise=gumbel"],
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
def test_cuda_graph_step_matches_eager(train_steps, weights_agree, switch, graphs):
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
    assert len(eager) == 12
    assert len(set(graphed[4:])) == 8  # replayed steps train on (a dead replay repeats)
    if "grouped" in switch:  # bf16 both ways, rounded differently: the losses only
        assert graphed == pytest.approx(eager, rel=1e-2)
        return
    # fp32 (TF32 off), other kernels: 12 Adam steps of lr 1e-3 move a weight by up to ~1e-2,
    # so all but a few entries within 1e-4 say the graph trained as eager did.
    assert graphed == pytest.approx(eager, rel=1e-3)
    weights_agree(w_graphed, w_eager, adam_steps=12)


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


@pytest.mark.parametrize("routing", ["dense", "topk"])
def test_bf16_on_cuda(train_steps, routing):
    """Autocast, and bf16-true's bf16 weights through the whole-step graph over a compiled
    forward: the stochastic-rounding Adam, compiled, its random draws inside the graph."""
    fp32, _ = train_steps(f"fp32-{routing}", CUDA, f"--model.routing={routing}")
    bf16, _ = train_steps(
        f"bf16-{routing}", CUDA, f"--model.routing={routing}", "--train.precision=bf16"
    )
    true, w = train_steps(
        f"bf16-true-{routing}",
        CUDA,
        f"--model.routing={routing}",
        "--train.precision=bf16-true",
        "--train.host_sync=log",
        "--train.cuda_graph=true",
        "--train.compile=default",
        steps=8,
    )
    assert bf16 != fp32
    assert bf16 == pytest.approx(fp32, rel=2e-2)
    assert true[:4] == pytest.approx(fp32, rel=2e-2)
    assert {t.dtype for t in w.values()} == {torch.bfloat16}


@pytest.mark.timeout(120)  # an empty group once hung CUDA's grouped kernel (pytorch#152668)
@pytest.mark.parametrize("num_experts", [5, 32])
def test_grouped_gemm_kernel_matches_batched(num_experts):
    """The bf16 grouped kernel against the fp32 batched path, same weights and noise. 32
    experts for 24 inputs at top-2 leave experts without inputs (groups of padding only)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        num_experts=num_experts,
        z_dim=3,
        encoder_layers=[7],
        decoder_layers=[6],
        manager_layers=[8],
        routing="topk",
        top_k=2,
        capacity_factor=0.0,
    )
    batched = MixtureOfVAEs(cfg, (1, 3, 3)).cuda()
    grouped = MixtureOfVAEs(cfg.model_copy(update={"expert_gemm": "grouped"}), (1, 3, 3)).cuda()
    grouped.load_state_dict(batched.state_dict())
    eps = torch.randn(num_experts, 24, 3, device="cuda")
    for m in (batched, grouped):
        m.noise = lambda e, n, z: eps[e, n]
    x, loss_cfg = torch.rand(24, 9, device="cuda"), LossConfig()
    ra, rb = batched.losses(x, loss_cfg), grouped.losses(x, loss_cfg)
    torch.testing.assert_close(rb.loss_BE, ra.loss_BE, rtol=2e-2, atol=1e-2)
    objective(ra, loss_cfg).total.backward()
    objective(rb, loss_cfg).total.backward()
    for (name, p), q in zip(batched.named_parameters(), grouped.parameters(), strict=True):
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0.03 * scale + 1e-6, msg=name)


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
            "--train.log_every=1",
            "--track.wandb=disabled",
        ],
    )
    trainer = Trainer(cfg, quiet=True)
    result = trainer.fit()
    assert trainer.step_graph is not None and trainer.step_graph.graph is not None
    assert trainer.step_graph.eager_calls == 3  # then recorded at step 4, replayed to step 8
    losses = step_values(result.run_dir / "metrics.jsonl")
    assert sorted(losses) == list(range(1, 9))
    assert len({losses[s] for s in range(4, 9)}) == 5  # every replay was a new step
    # The epoch's sums were kept inside the graph: they add up the logged losses.
    assert trainer.epoch_sums[0].item() == pytest.approx(sum(losses.values()), rel=1e-5)


def test_rounding_draws_are_the_same_on_cuda_eager_and_compiled():
    """The stochastic-rounding hash in CUDA's int32 arithmetic (eager kernels and inductor's
    Triton) gives the CPU's bits, so a run's rounding does not depend on where it ran."""
    from moe_vae.stochastic_adam import random_bits, round_stochastic, stream_key

    def draw(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bits = random_bits(x, stream_key(torch.tensor(17.0, device=x.device), 5))
        return bits, round_stochastic(x, bits)

    x = torch.randn(100_003, generator=torch.Generator().manual_seed(0))
    cpu_bits, cpu_rounded = draw(x)
    for fn in (draw, torch.compile(draw)):
        bits, rounded = fn(x.cuda())
        assert torch.equal(bits.cpu(), cpu_bits)
        assert torch.equal(rounded.cpu(), cpu_rounded)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> Path:
    """The tiny recipe trained on the CPU, for the commands after training to load on CUDA."""
    from moe_vae.train import train

    cfg = load_config(
        Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml",
        [
            f"--output.dir={tmp_path_factory.mktemp('use')}",
            "--output.name=r",
            "--train.device=cpu",
            "--track.wandb=disabled",
        ],
    )
    return train(cfg, quiet=True).run_dir


def _table(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_assign_and_score_on_cuda(cpu_run, tmp_path):
    """The noise generator on the model's device and the results brought back to the host:
    the manager's probabilities (no noise in them) are the CPU's."""
    from moe_vae.cli import main

    for device in ("cpu", "cuda"):
        for command in ("assign", "score"):
            out = tmp_path / f"{command}-{device}.csv"
            args = ["--checkpoint", str(cpu_run), "--limit", "40", "--device", device]
            assert main([command, *args, "--out", str(out)]) == 0
    cpu, cuda = _table(tmp_path / "assign-cpu.csv"), _table(tmp_path / "assign-cuda.csv")
    assert len(cuda) == 40 and [r["key"] for r in cuda] == [r["key"] for r in cpu]
    for a, b in zip(cpu, cuda, strict=True):
        probs = [float(b[f"p_{e}"]) for e in range(4)]
        assert probs == pytest.approx([float(a[f"p_{e}"]) for e in range(4)], abs=1e-4)
        assert int(b["cluster"]) == int(np.argmax(probs))
    nll = [float(r["nll"]) for r in _table(tmp_path / "score-cuda.csv")]
    assert len(nll) == 40 and np.isfinite(nll).all()


def test_sample_on_cuda(cpu_run, tmp_path):
    """z drawn on CUDA from the seed, decoded there, the images brought back."""
    from moe_vae.cli import main

    out = tmp_path / "e.npy"
    args = ["--checkpoint", str(cpu_run), "--expert", "1", "--n", "12", "--seed", "3"]
    assert main(["sample", *args, "--device", "cuda", "--out", str(out)]) == 0
    images = np.load(out)
    model, _ = load_trained(cpu_run, device="cuda")
    z = torch.randn(
        12, model.cfg.z_dim, generator=torch.Generator("cuda").manual_seed(3), device="cuda"
    )
    np.testing.assert_allclose(
        images.reshape(12, -1), model.generate(z, 1).cpu().numpy(), rtol=1e-5
    )
    mix = tmp_path / "m.png"
    mixture = ["--checkpoint", str(cpu_run), "--mixture", "--device", "cuda"]
    assert main(["sample", *mixture, "--out", str(mix)]) == 0
    assert mix.stat().st_size > 0
