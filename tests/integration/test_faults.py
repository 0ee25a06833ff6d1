"""Runs that get killed, pre-empted or hit non-finite values lose nothing: the real CLI in a
subprocess is killed (SIGKILL) or pre-empted (SIGTERM) at a random step and resumed, and ends
exactly like a run that was never interrupted (one process, CPU: bit for bit)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_vae.config import load_config
from moe_vae.errors import MoeVaeError
from moe_vae.track.jsonl import read_jsonl, step_values
from moe_vae.train.trainer import Stopped, Trainer

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.prefix) / "bin"
# 2,000 images, batch 50: 40 steps per epoch, 3 epochs; a checkpoint every 7 steps.
ARGS = [
    "--config",
    "configs/tiny.yaml",
    "--data.train_limit=2000",
    "--train.epochs=3",
    "--train.log_every=1",
    "--train.checkpoint_every=7",
    "--track.wandb=disabled",
    "--quiet",
]


def _start(out: Path, name: str, *extra: str, group: bool = False) -> subprocess.Popen:
    """The CLI in a subprocess (`group`: leading a process group of its own, with its loader
    workers, for a signal to all of them)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [
            str(BIN / "moe-vae"),
            "train",
            *ARGS,
            f"--output.dir={out}",
            f"--output.name={name}",
            *extra,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=group,
    )


def _steps(run: Path) -> dict[int, float]:
    return step_values(run / "metrics.jsonl")


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and max(_steps(run), default=0) >= step:
            return
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full")
    proc = _start(out, "full")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return out / "full"


def _same_as(run: Path, reference: Path) -> None:
    a, b = _steps(reference), _steps(run)
    assert sorted(a) == sorted(b) == list(range(1, 121))
    assert a == b
    wa, wb = load_file(reference / "model.safetensors"), load_file(run / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, uninterrupted, sig):
    stop_at = random.Random(int(time.time())).randint(9, 100)
    proc = _start(tmp_path, "r")
    _wait_for_step(tmp_path / "r", stop_at, proc)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    stderr = proc.stderr.read()
    ckpt = tmp_path / "r" / "checkpoint.pt"
    if sig == signal.SIGTERM:  # pre-emption: a checkpoint right after the current step
        assert proc.returncode == 143, stderr
        assert "stopped by SIGTERM at step" in stderr and "--train.resume=" in stderr
        saved = torch.load(ckpt, weights_only=True)["step"]
        assert saved >= stop_at
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not list((tmp_path / "r").glob(".*.tmp")) or ckpt.is_file()
    resumed = _start(tmp_path, "r", f"--train.resume={ckpt}")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    _same_as(tmp_path / "r", uninterrupted)


def test_sigterm_to_every_process_with_streaming_workers_still_checkpoints(tmp_path):
    """What SLURM's --signal does: SIGTERM to the trainer and its DataLoader workers at once.
    The workers ignore it (a dead one used to make the DataLoader raise in the middle of the
    pre-emption checkpoint, leaving only a .tmp file), the trainer checkpoints and exits 143."""
    proc = _start(
        tmp_path,
        "s",
        "--data.loader=stream",
        "--data.num_workers=2",
        "--data.train_limit=null",
        group=True,
    )
    _wait_for_step(tmp_path / "s", 5, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    stderr = proc.stderr.read()
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "stopped by SIGTERM at step" in stderr
    assert torch.load(tmp_path / "s" / "checkpoint.pt", weights_only=True)["step"] >= 5


def _nan_at(trainer: Trainer, bad_steps: set[int]) -> None:
    """Make the loss non-finite at the given (1-based) steps: a fault injected at the model."""
    losses = trainer.model.losses

    def patched(x, cfg, generator=None, **options):
        routed = losses(x, cfg, generator, **options)
        if trainer.step + 1 in bad_steps:
            routed.loss_BE = routed.loss_BE * float("nan")
        return routed

    trainer.model.losses = patched  # type: ignore[method-assign]


def _cfg(tmp_path, *extra):
    return load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"--output.dir={tmp_path}",
            "--output.name=n",
            "--track.wandb=disabled",
            "--train.log_every=1",
            *extra,
        ],
    )


def test_nonfinite_steps_are_skipped_without_touching_the_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    trainer = Trainer(_cfg(tmp_path), quiet=True)
    _nan_at(trainer, {5, 6})
    snapshots = {}
    step_fn = trainer.train_step

    def recording(x, *rest):
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        out = step_fn(x, *rest)
        snapshots[trainer.step + 1] = (
            before,
            {k: v.clone() for k, v in trainer.model.state_dict().items()},
        )
        return out

    trainer.train_step = recording  # type: ignore[method-assign]
    res = trainer.fit()
    for step in (5, 6):
        before, after = snapshots[step]
        assert all(torch.equal(before[k], after[k]) for k in before), step
    before, after = snapshots[7]
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert res.epochs[-1]["train/nonfinite_skipped"] == 2
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in res.epochs)


@pytest.mark.parametrize("sync", [[], ["--train.host_sync=log", "--optim.impl=fused"]])
def test_too_many_nonfinite_steps_stop_with_the_last_good_state(tmp_path, monkeypatch, sync):
    """The stop, and a resume from its checkpoint that still counts the 3 skipped steps
    (host_sync=log: its device-side counters are restored too)."""
    monkeypatch.chdir(REPO)
    trainer = Trainer(_cfg(tmp_path, "--train.max_nonfinite_in_row=3", *sync), quiet=True)
    _nan_at(trainer, set(range(4, 100)))
    with pytest.raises(Stopped, match=r"3 steps in a row had a non-finite loss") as info:
        trainer.fit()
    assert info.value.exit_code == 3
    ckpt = torch.load(tmp_path / "n" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    resume = f"--train.resume={tmp_path / 'n' / 'checkpoint.pt'}"
    resumed = Trainer(_cfg(tmp_path, "--train.max_nonfinite_in_row=3", *sync, resume), quiet=True)
    _nan_at(resumed, {7})  # at once: the stop's streak does not carry over (a fresh allowance)
    res = resumed.fit()
    assert res.epochs[-1]["train/nonfinite_skipped"] == 4  # the 3 before, still counted


def test_collapse_is_reported_and_dead_experts_are_revived(tmp_path, monkeypatch):
    """Thresholds set so that usage always trips them: the collapse event and warning appear
    and experts below the in-use share are revived at each epoch's end."""
    monkeypatch.chdir(REPO)
    cfg = _cfg(
        tmp_path,
        "--train.collapse_share=0.26",  # 4 experts: some expert always gets more than 1/4
        "--train.revive_dead_experts=true",
        "--eval.in_use_min_fraction=0.24",
    )
    res = Trainer(cfg, quiet=True).fit()
    events = read_jsonl(tmp_path / "n" / "metrics.jsonl")
    collapses = [e for e in events if e.get("event") == "manager_collapse"]
    revived = [e for e in events if e.get("event") == "experts_revived"]
    assert len(collapses) == 2 and all(max(e["share"]) > 0.26 for e in collapses)
    assert revived and all(len(e["pairs"]) >= 1 for e in revived)
    for e in revived:
        dead = {d for d, _ in e["pairs"]}
        donors = {d for _, d in e["pairs"]}
        assert not dead & donors
    assert all(r["experts/collapse"] for r in res.epochs)
    assert sum(r["experts/revived"] for r in res.epochs) == sum(len(e["pairs"]) for e in revived)
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in res.epochs)


def test_host_sync_log_skips_like_step_mode_without_waiting(tmp_path, monkeypatch):
    """host_sync=log: the fused Adam kernel skips the non-finite steps on its own; the result
    is the step-synchronised run's, and the skips are reported at the next logged step."""
    monkeypatch.chdir(REPO)
    synced = Trainer(_cfg(tmp_path / "a"), quiet=True)
    _nan_at(synced, {5, 6})
    synced.fit()
    deferred = Trainer(
        _cfg(tmp_path / "b", "--train.host_sync=log", "--train.log_every=4"), quiet=True
    )
    _nan_at(deferred, {5, 6})
    res = deferred.fit()
    a, b = synced.model.state_dict(), deferred.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert res.epochs[-1]["train/nonfinite_skipped"] == 2
    assert [r["loss/total"] for r in res.epochs] == [r["loss/total"] for r in synced.epochs]
    events = [r for r in read_jsonl(tmp_path / "b" / "n" / "metrics.jsonl") if "event" in r]
    skipped = [r for r in events if r["event"] == "nonfinite_step_skipped"]
    assert [(r["step"], r["count"]) for r in skipped] == [(8, 2)]  # the next logged step


def test_host_sync_log_stops_at_a_logged_step_and_needs_fused_adam(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = _cfg(
        tmp_path, "--train.host_sync=log", "--train.log_every=5", "--train.max_nonfinite_in_row=3"
    )
    trainer = Trainer(cfg, quiet=True)
    _nan_at(trainer, set(range(4, 100)))
    with pytest.raises(Stopped, match=r"7 steps in a row had a non-finite loss"):
        trainer.fit()  # steps 4..10 skipped; seen at step 10
    ckpt = torch.load(tmp_path / "n" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 10
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    # A run of 4 that ended (steps 2-5) before the host reads the counters (step 8): the
    # longest run since the last read stops it, not only the run still going on.
    cfg = _cfg(
        tmp_path / "ended",
        "--train.host_sync=log",
        "--train.log_every=8",
        "--train.max_nonfinite_in_row=3",
    )
    trainer = Trainer(cfg, quiet=True)
    _nan_at(trainer, {2, 3, 4, 5})
    with pytest.raises(Stopped, match=r"^4 steps in a row had a non-finite loss"):
        trainer.fit()
    events = read_jsonl(tmp_path / "ended" / "n" / "metrics.jsonl")
    skipped = [r for r in events if r.get("event") == "nonfinite_step_skipped"]
    assert [(r["step"], r["count"], r["in_row"], r["longest_in_row"]) for r in skipped] == [
        (8, 4, 0, 4)
    ]
    with pytest.raises(MoeVaeError, match=r"optim\.impl=fused"):
        Trainer(_cfg(tmp_path, "--train.host_sync=log", "--optim.impl=foreach"), quiet=True)
