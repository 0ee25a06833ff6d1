"""The naive baseline computes our loss (so the benchmark compares like with like), and
`moe-vae bench` prints both rows and the ratio."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from moe_vae.bench.naive import NaiveMixture
from moe_vae.config import load_config
from moe_vae.model.losses import objective
from moe_vae.model.mixture import MixtureOfVAEs

REPO = Path(__file__).resolve().parents[2]


def _copy_stacked(stacked: nn.Module, linears: list[nn.Linear], e: int) -> None:
    for layer, lin in zip(stacked.layers, linears, strict=True):
        lin.weight.data.copy_(layer.weight_EIO[e].T)
        lin.bias.data.copy_(layer.bias_EO[e])


@pytest.mark.parametrize(
    "extra",
    [[], ["--loss.objective=mixture", "--loss.likelihood=bernoulli", "--model.activation=relu"]],
)
def test_naive_baseline_computes_the_same_loss(extra):
    cfg = load_config(
        None,
        ["--model.num_experts=3", "--model.z_dim=4", "--model.encoder_layers=[16, 8]", *extra],
    )
    torch.manual_seed(0)
    ours = MixtureOfVAEs(cfg.model, (1, 5, 5))
    naive = NaiveMixture(cfg, 25)
    for e, vae in enumerate(naive.vaes):
        _copy_stacked(ours.experts.encoder, [m for m in vae.encoder if isinstance(m, nn.Linear)], e)
        _copy_stacked(ours.experts.decoder, [m for m in vae.decoder if isinstance(m, nn.Linear)], e)
    naive_manager = [m for m in naive.manager if isinstance(m, nn.Linear)]
    for lin, ref in zip(naive_manager, ours.manager.layers, strict=True):
        lin.load_state_dict(ref.state_dict())
    x = torch.rand(6, 25)
    eps = torch.randn(3, 6, 4)
    ours.noise = lambda ids, n, z: eps[ids, n]
    want = objective(ours.losses(x, cfg.loss), cfg.loss).total
    got = naive(x, eps)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_bench_command_prints_both_rows_and_the_ratio(tmp_path):
    moe_vae = Path(sys.prefix) / "bin" / "moe-vae"
    args = ["bench", "--config", "configs/tiny.yaml", "--steps=3", "--warmup=1", "--repeats=2"]
    proc = subprocess.run(
        [str(moe_vae), *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
    assert "moe-vae" in rows and "naive" in rows and "vs naive" in proc.stdout
    assert rows["naive"][-2] == "1.00x" and rows["moe-vae"][-2].endswith("x")
    assert float(rows["moe-vae"][1]) > 0  # steps/s
    assert "profile" not in proc.stdout  # only when asked


def test_bench_profile_splits_the_step_into_phases(tmp_path):
    moe_vae = Path(sys.prefix) / "bin" / "moe-vae"
    args = ["bench", "--config", "configs/tiny.yaml", "--steps=2", "--warmup=1", "--repeats=1"]
    proc = subprocess.run(
        [str(moe_vae), *args, "--no-baseline", "--profile=3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "profile: 3 steps of moe-vae on cpu" in proc.stdout
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line}
    host = {p: float(rows[p][0]) for p in ("forward+other", "backward", "optimizer")}
    ops = {p: int(rows[p][2]) for p in ("forward+other", "backward", "optimizer")}
    assert all(v > 0 for v in host.values()) and all(v > 0 for v in ops.values())
    assert int(rows["total"][2]) == sum(ops.values())
    assert ops["backward"] > ops["optimizer"]  # fused Adam: a couple of ops for all weights

    conv = subprocess.run(
        [str(moe_vae), *args, "--model.expert=conv"], cwd=REPO, capture_output=True, text=True
    )
    assert conv.returncode == 2 and "--no-baseline" in conv.stderr
    assert len(conv.stderr.strip().splitlines()) == 1


def test_bench_runs_the_cuda_graph_step_on_sample_indices(tmp_path, monkeypatch):
    """train.cuda_graph: the bench feeds the recorded step the epoch plan's index rows, as the
    trainer does (on a CPU the step runs without a graph)."""
    from contextlib import ExitStack

    from moe_vae.bench.run import ours

    monkeypatch.chdir(REPO)
    cfg = load_config(
        "configs/tiny.yaml",
        [f"--output.dir={tmp_path}", "--train.host_sync=log", "--train.cuda_graph=true"],
    )
    with ExitStack() as stack:
        mine, _ = ours(cfg, stack)
        idx_B = next(mine.batches)
        assert idx_B.dtype == torch.long and idx_B.shape == (cfg.train.batch_size,)
        losses = [mine.step(next(mine.batches)) for _ in range(3)]
    assert all(torch.isfinite(loss) for loss in losses)
    assert len({float(loss) for loss in losses}) == 3  # three different batches and updates


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (["--data.name=shards", "--data.train_shards=x.tar"], r"MNIST only \(data\.name=shards\)"),
        (["--model.hierarchy=[2, 2]"], r"flat manager only \(model\.hierarchy=\[2, 2\]\)"),
        (["--model.routing=topk"], r"dense routing over MLP experts only"),
    ],
)
def test_the_baseline_refuses_configs_it_would_not_run_alike(extra, reason):
    """The baseline reads the embedded MNIST through a flat, dense mixture: any other workload
    would make the ratio compare two different jobs."""
    from moe_vae.bench.scope import unsupported

    assert unsupported(load_config(None, [])) is None
    message = unsupported(load_config(None, extra))
    assert message is not None
    assert re.search(reason, message), message
