"""Stop a run mid-epoch, resume from its checkpoint: the same steps, losses and weights as a run
that never stopped (bit-identical on CPU, one process)."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from moe_vae.config import load_config
from moe_vae.track.jsonl import step_values
from moe_vae.train import train
from moe_vae.train.checkpoint import CheckpointError, auto_resume_path, save_checkpoint


def _cfg(tmp_path, name, *extra):
    return load_config(
        "configs/tiny.yaml",
        [
            f"--output.dir={tmp_path}",
            f"--output.name={name}",
            "--train.log_every=1",
            "--train.epochs=3",
            *extra,
        ],
    )


def ckpt_config(path):
    return torch.load(path, weights_only=True)["config"]


def _steps(run_dir):
    return step_values(run_dir / "metrics.jsonl")


def _mnist_shards(out):
    """The first 500 MNIST train images in 4 shards (10 steps of 50 per epoch, 2 workers)."""
    from moe_vae.data.mnist import EMBEDDED_DIR, load_split
    from moe_vae.data.sources import from_arrays
    from moe_vae.data.writer import WriteOptions, write_shards

    split = load_split(EMBEDDED_DIR, "train")
    src = from_arrays(split.images[:500], split.labels[:500], "train-")
    manifest = write_shards(src, out, "train", WriteOptions(125, "sample"), progress=False)
    return str(out / manifest["pattern"])


@pytest.mark.parametrize(
    "loader,precision", [("memory", "fp32"), ("stream", "fp32"), ("memory", "bf16-true")]
)
def test_resume_mid_epoch_equals_uninterrupted(tmp_path, monkeypatch, repo, loader, precision):
    """bf16-true: the checkpoint keeps the bf16 weights and Adam's bf16 moments as they were."""
    monkeypatch.chdir(repo)
    extra = [f"--data.loader={loader}", f"--train.precision={precision}"]
    if loader == "stream":  # DataLoader workers streaming standard WebDataset samples
        extra += [
            "--data.name=shards",
            f"--data.train_shards={_mnist_shards(tmp_path / 's')}",
            "--data.train_limit=null",
            "--data.num_workers=2",
            "--data.shuffle_buffer=100",
        ]
    full = train(_cfg(tmp_path, "full", *extra), quiet=True)
    # Stop at step 13 of 30 (mid epoch 2), then resume the same config from its checkpoint.
    part = train(_cfg(tmp_path, "part", *extra, "--train.max_steps=13"), quiet=True)
    assert part.final_eval["steps"] == 13
    ckpt = part.run_dir / "checkpoint.pt"
    resumed = train(_cfg(tmp_path, "part", *extra, f"--train.resume={ckpt}"), quiet=True)
    assert resumed.run_dir == part.run_dir

    a, b = _steps(full.run_dir), _steps(resumed.run_dir)
    assert sorted(a) == sorted(b) == list(range(1, 31))
    assert a == b  # every step's loss, bit for bit
    wa = load_file(full.run_dir / "model.safetensors")
    wb = load_file(resumed.run_dir / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert {w.dtype for w in wa.values()} == {dtype}
    keys = ("loss/total", "loss/expected", "loss/balancing")
    assert [[r[k] for k in keys] for r in full.epochs] == [
        [r[k] for k in keys] for r in resumed.epochs
    ]
    assert full.final_eval == resumed.final_eval
    for r in full.epochs:  # resident memory in every epoch record
        assert r["memory/rss_mb"] > 50
        if loader == "stream":  # its DataLoader workers (children: also W&B's service)
            assert r["memory/children_uss_mb"] > 5


def test_periodic_checkpoints_and_bad_resume(tmp_path, monkeypatch, repo):
    monkeypatch.chdir(repo)
    res = train(
        _cfg(tmp_path, "p", "--train.checkpoint_every=4", "--train.max_steps=6"), quiet=True
    )
    ckpt = res.run_dir / "checkpoint.pt"
    assert ckpt.is_file() and not list(res.run_dir.glob(".*.tmp"))
    before = sorted(p.name for p in res.run_dir.iterdir())
    with pytest.raises(
        CheckpointError, match=r"shape \(model\.z_dim: 4 in the checkpoint, 5 asked\)"
    ):
        train(_cfg(tmp_path, "p", "--model.z_dim=5", f"--train.resume={ckpt}"), quiet=True)
    weights_only = {"model": {}, "config": ckpt_config(ckpt)}  # no counters, no data position
    torch.save(weights_only, tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match=r"cannot resume training: it lacks step, data"):
        train(_cfg(tmp_path, "q", f"--train.resume={tmp_path / 'weights.pt'}"), quiet=True)
    (tmp_path / "trunc.pt").write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or not a moe-vae checkpoint"):
        train(_cfg(tmp_path, "q", f"--train.resume={tmp_path / 'trunc.pt'}"), quiet=True)
    with pytest.raises(CheckpointError, match="not found"):
        train(_cfg(tmp_path, "q", f"--train.resume={tmp_path / 'none.pt'}"), quiet=True)
    assert sorted(p.name for p in res.run_dir.iterdir()) == before
    assert not (tmp_path / "q").exists()


def test_keep_last_k_and_resume_auto(tmp_path, monkeypatch, repo):
    monkeypatch.chdir(repo)
    cfg = _cfg(
        tmp_path,
        "k",
        "--train.checkpoint_every=3",
        "--train.keep_checkpoints=2",
        "--train.max_steps=13",
        "--track.wandb=disabled",
    )
    res = train(cfg, quiet=True)
    kept = sorted(p.name for p in (res.run_dir / "checkpoints").iterdir())
    assert kept == ["step-000000012.pt", "step-000000013.pt"]  # every 3 steps + the end, last 2
    latest = torch.load(res.run_dir / "checkpoint.pt", weights_only=True)
    assert latest["step"] == 13
    assert not list(res.run_dir.glob(".*"))  # no temporary files left
    # A job that died before checkpoint.pt pointed at its newest step file resumes from that
    # file (it used to find nothing, start over and delete the run directory).
    (res.run_dir / "checkpoint.pt").unlink()
    assert auto_resume_path(res.run_dir) == res.run_dir / "checkpoints" / "step-000000013.pt"
    # resume=auto picks the newest checkpoint of output.dir/output.name and finishes the run.
    done = train(_cfg(tmp_path, "k", "--train.resume=auto", "--track.wandb=disabled"), quiet=True)
    assert done.final_eval["steps"] == 30 and done.run_dir == res.run_dir
    # ... and starts fresh where there is nothing to resume.
    fresh = train(
        _cfg(
            tmp_path, "new", "--train.resume=auto", "--train.max_steps=2", "--track.wandb=disabled"
        ),
        quiet=True,
    )
    assert fresh.final_eval["steps"] == 2


def test_resuming_a_run_finished_at_max_steps_takes_no_step(tmp_path, monkeypatch, repo):
    """A requeued job (resume=auto, same command) whose run already reached train.max_steps."""
    monkeypatch.chdir(repo)
    args = ("--train.max_steps=6", "--train.resume=auto", "--track.wandb=disabled")
    first = train(_cfg(tmp_path, "m", *args), quiet=True)
    weights = load_file(first.run_dir / "model.safetensors")
    again = train(_cfg(tmp_path, "m", *args), quiet=True)
    assert again.final_eval["steps"] == 6 and len(again.epochs) == len(first.epochs)
    after = load_file(first.run_dir / "model.safetensors")
    assert all(torch.equal(after[k], w) for k, w in weights.items())


def test_roll_back_sets_later_checkpoints_aside(tmp_path, monkeypatch, repo):
    """Resuming from a kept step-N.pt: the later ones leave the rotation (kept aside, not
    deleted), checkpoint.pt points at step N at once, and config.yaml, loadable with --config,
    does not carry the one-off resume path."""
    monkeypatch.chdir(repo)
    common = ("--train.checkpoint_every=5", "--train.keep_checkpoints=5", "--track.wandb=disabled")
    res = train(_cfg(tmp_path, "r", *common, "--train.max_steps=15"), quiet=True)
    step5 = res.run_dir / "checkpoints" / "step-000000005.pt"
    cfg = _cfg(tmp_path, "r", *common, "--train.max_steps=7", f"--train.resume={step5}")
    with pytest.warns(UserWarning, match=r"rolled back to step-000000005\.pt: the 2 later"):
        train(cfg, quiet=True)
    aside = sorted(p.name for p in (res.run_dir / "checkpoints" / "rolled-back").iterdir())
    assert aside == ["step-000000010.pt", "step-000000015.pt"]
    kept = sorted(p.name for p in (res.run_dir / "checkpoints").glob("step-*.pt"))
    assert kept == ["step-000000005.pt", "step-000000007.pt"]
    assert torch.load(res.run_dir / "checkpoint.pt", weights_only=True)["step"] == 7
    assert load_config(res.run_dir / "config.yaml").train.resume is None
    set_aside = res.run_dir / "checkpoints" / "rolled-back" / "step-000000015.pt"
    with pytest.raises(CheckpointError, match=r"set aside by a roll-back: move it back into"):
        train(_cfg(tmp_path, "r", *common, f"--train.resume={set_aside}"), quiet=True)


def test_resume_auto_needs_a_run_name():
    from moe_vae.config import ConfigError

    with pytest.raises(ConfigError, match=r"train\.resume=auto needs output\.name"):
        load_config(None, ["--train.resume=auto"])


def test_resume_mid_epoch_with_another_data_order_says_so(tmp_path, monkeypatch, repo):
    """Stopped at step 5 of 10 in epoch 1 and resumed with another global batch or seed: the
    skipped batches are not the ones trained, and the warning names what changed; the same
    config resumes without it."""
    import warnings

    monkeypatch.chdir(repo)
    first = train(_cfg(tmp_path, "r", "--train.max_steps=5", "--track.wandb=disabled"), quiet=True)
    ckpt = first.run_dir / "checkpoint.pt"
    assert torch.load(ckpt, weights_only=True)["data"]["order"]["global_batch"] == 50
    with pytest.warns(UserWarning, match=r"global_batch 50 -> 25; seed 0 -> 3: the rest of"):
        train(
            _cfg(
                tmp_path,
                "r",
                "--train.max_steps=6",
                "--train.batch_size=25",
                "--train.seed=3",
                f"--train.resume={ckpt}",
                "--track.wandb=disabled",
            ),
            quiet=True,
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(
            _cfg(
                tmp_path,
                "r",
                "--train.max_steps=7",
                "--train.batch_size=25",
                "--train.seed=3",
                f"--train.resume={ckpt}",
                "--track.wandb=disabled",
            ),
            quiet=True,
        )
    assert not [w for w in caught if "data order" in str(w.message)]


def test_resume_path_without_config_continues_that_runs_config(tmp_path, monkeypatch, repo):
    """`moe-vae train --train.resume=<checkpoint>` alone (the README's and the pre-emption
    message's command): the checkpoint's own config, overrides on top, not the defaults (which
    trained a tiny finished run on all of MNIST for 100 epochs and rewrote its config.yaml)."""
    monkeypatch.chdir(repo)
    first = train(_cfg(tmp_path, "r", "--train.max_steps=5", "--track.wandb=disabled"), quiet=True)
    before = (first.run_dir / "config.yaml").read_text()
    moe_vae = [str(Path(sys.prefix) / "bin" / "moe-vae"), "train"]
    ckpt = f"--train.resume={first.run_dir / 'checkpoint.pt'}"
    shown = subprocess.run(
        [*moe_vae, ckpt, "--train.max_steps=7", "--print-config"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    cfg = load_config(None, [])  # the defaults, for contrast
    resolved = yaml.safe_load(shown.stdout)
    assert resolved["data"]["train_limit"] == 500 != cfg.data.train_limit
    assert resolved["model"]["num_experts"] == 4 != cfg.model.num_experts
    assert resolved["train"]["max_steps"] == 7 and resolved["train"]["epochs"] == 3
    proc = subprocess.run(
        [*moe_vae, ckpt, "--train.max_steps=7", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert max(_steps(first.run_dir)) == 7
    after = (first.run_dir / "config.yaml").read_text()
    assert after == before.replace("max_steps: 5", "max_steps: 7")


def test_resume_under_other_routing_keeps_the_weights(tmp_path, monkeypatch, repo):
    """Routing settings define no weight: a top-k grouped run goes on batched (what sharding
    its experts needs) with another capacity, said in a warning, and trains on from the
    checkpoint's weights. (A setting that shapes the weights is still refused:
    test_periodic_checkpoints_and_bad_resume.)"""
    monkeypatch.chdir(repo)
    topk = ["--model.routing=topk", "--model.top_k=2", "--train.max_steps=4"]
    first = train(_cfg(tmp_path, "g", *topk, "--model.expert_gemm=grouped"), quiet=True)
    ckpt = first.run_dir / "checkpoint.pt"
    saved = torch.load(ckpt, weights_only=True)["model"]
    batched = _cfg(
        tmp_path,
        "g",
        *topk[:2],
        "--model.capacity_factor=2",
        "--train.max_steps=5",
        f"--train.resume={ckpt}",
    )
    with pytest.warns(
        UserWarning,
        match=r"other routing \(model\.capacity_factor 1\.25 -> 2\.0, "
        r"model\.expert_gemm 'grouped' -> 'batched'\)",
    ):
        resumed = train(batched, quiet=True)
    assert sorted(_steps(resumed.run_dir)) == [1, 2, 3, 4, 5]
    after = load_file(resumed.run_dir / "model.safetensors")
    assert after.keys() == saved.keys()
    assert any(not torch.equal(after[k], saved[k]) for k in saved)  # step 5 trained them


def test_a_checkpoint_that_cannot_be_written_is_one_error_and_keeps_the_last(tmp_path):
    """A full disk, here a file-size limit (EFBIG, as ENOSPC would be): one CheckpointError
    naming the file, no temporary file left, the previous checkpoint intact."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the error, not the signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(CheckpointError, match=r"cannot write checkpoint '.*checkpoint\.pt'"):
            save_checkpoint(path, {"step": 2, "weights": torch.zeros(100_000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_resume_on_another_world_size_draws_fresh_noise(tmp_path, monkeypatch, repo):
    """A checkpoint of another world size holds no random stream for this rank: the resumed
    rank draws one from (seed, rank, step), not the stream the run began with again."""
    monkeypatch.chdir(repo)
    from moe_vae.train.trainer import Trainer

    res = train(
        _cfg(
            tmp_path,
            "w",
            "--train.checkpoint_every=2",
            "--train.max_steps=4",
            "--train.keep_checkpoints=2",
        ),
        quiet=True,
    )
    draws = {}
    for step in (2, 4):
        ckpt = torch.load(res.run_dir / "checkpoints" / f"step-{step:09d}.pt", weights_only=True)
        ckpt["world_size"] = 2  # as if written by a 2-rank job
        ckpt.pop("rng_per_rank", None)
        torch.save(ckpt, tmp_path / f"two-{step}.pt")
        # No W&B: a run started and never finished would stay this process's active run.
        resume = f"--train.resume={tmp_path / f'two-{step}.pt'}"
        Trainer(_cfg(tmp_path, f"r{step}", resume, "--track.wandb=disabled"))
        draws[step] = torch.rand(4)
    Trainer(_cfg(tmp_path, "fresh", "--track.wandb=disabled"))
    fresh = torch.rand(4)
    assert not torch.equal(draws[2], draws[4])
    assert not torch.equal(draws[2], fresh) and not torch.equal(draws[4], fresh)
