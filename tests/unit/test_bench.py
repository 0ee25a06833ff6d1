"""The naive baseline computes our loss (so the benchmark compares like with like), and
`moe-vae bench` prints both rows and the ratio."""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import moe_vae.bench.run as bench_run
from moe_vae import cli
from moe_vae.bench.naive import NaiveMixture
from moe_vae.bench.run import BenchRow, format_table
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


@pytest.mark.parametrize("extra", [[], ["--train.host_sync=log", "--train.cuda_graph=true"]])
def test_bench_times_the_trainers_own_step_loop(tmp_path, monkeypatch, extra):
    """Ours in the bench is the trainer's step loop (its data, its step, its epoch sums; under
    train.cuda_graph the recorded step, which runs without a graph on a CPU): its losses are a
    trainer's first steps' loss/total, bit for bit. It timed train_step alone before, less
    than a real step (no epoch sums), and fed it no label or warm-start term."""
    from contextlib import ExitStack

    from moe_vae.bench.run import ours
    from moe_vae.train.trainer import Trainer

    monkeypatch.chdir(REPO)
    cfg = load_config("configs/tiny.yaml", [f"--output.dir={tmp_path}", *extra])
    with ExitStack() as stack:
        mine, _ = ours(cfg, stack)
        losses = [float(mine.step(next(mine.batches))) for _ in range(3)]
    solo = cfg.model_copy(update={"track": cfg.track.model_copy(update={"wandb": "disabled"})})
    trainer = Trainer(
        solo.model_copy(update={"output": solo.output.model_copy(update={"name": "t"})})
    )
    steps = trainer._steps(1)
    expected = [float(next(steps)[0][0]) for _ in range(3)]
    assert losses == expected and len(set(losses)) == 3


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (["--data.name=shards", "--data.train_shards=x.tar"], r"MNIST only \(data\.name=shards\)"),
        (["--model.hierarchy=[2, 2]"], r"flat manager only \(model\.hierarchy=\[2, 2\]\)"),
        (["--model.routing=topk"], r"dense routing over MLP experts only"),
        (["--loss.label_fraction=0.1"], r"naive baseline is unsupervised"),
        (["--warm_start.method=cluster"], r"no warm start \(warm_start\.method=cluster\)"),
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


def test_each_contender_runs_under_its_own_matmul_settings(tmp_path, monkeypatch):
    """The trainer sets TF32 process-wide (train.tf32): the baseline, built after it, ran its
    matmuls in TF32 too. Each contender now runs under its own flags, and run_bench leaves the
    process's as it found them."""
    from moe_vae.bench.run import backend_flags, run_bench

    monkeypatch.chdir(REPO)
    seen: dict[str, set[bool]] = {}
    real_naive = bench_run.naive

    def watched_naive(cfg, device):
        contender = real_naive(cfg, device)
        inner = contender.step

        def step(x):
            seen.setdefault("naive", set()).add(torch.backends.cuda.matmul.allow_tf32)
            return inner(x)

        contender.step = step
        return contender

    monkeypatch.setattr(bench_run, "naive", watched_naive)
    before = backend_flags()
    cfg = load_config("configs/tiny.yaml", [f"--output.dir={tmp_path}", "--train.tf32=true"])
    rows, _, _ = run_bench(cfg, steps=2, warmup=1, repeats=2, baseline=True)
    assert seen["naive"] == {False} and [r.name for r in rows] == ["moe-vae", "naive loop"]
    assert backend_flags() == before


def test_speedup_is_the_median_of_each_rounds_ratio():
    """Rounds run back to back in pairs: a slow phase of the machine lands in one pair, and
    the median of the pairs' ratios leaves it out (the ratio of the two medians mixes rounds
    run at different times: here 2.0 where every round but one says at most 1)."""
    rows = [
        BenchRow(name, statistics.median(r), 100, 600, 100, 0.0, torch.device("cpu"), r)
        for name, r in (("moe-vae", [1.0, 1.0, 4.0]), ("naive loop", [1.0, 4.0, 2.0]))
    ]
    assert rows[0].speedup_over(rows[1]) == 1.0
    assert "1.00x" in format_table(rows, "cpu", 3).splitlines()[2]


@pytest.mark.parametrize("extra", [["--train.compile=default"], ["--train.cuda_graph=true"]])
def test_a_warmup_too_short_for_compiling_or_recording_is_refused(capsys, extra):
    code = cli.main(
        [
            "bench",
            "--config",
            "configs/tiny.yaml",
            "--warmup=3",
            "--print-config",
            "--train.host_sync=log",
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--warmup 3: expected at least 4" in err
    assert len(err.strip().splitlines()) == 1
