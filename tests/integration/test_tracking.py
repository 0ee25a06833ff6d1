"""W&B tracking, read back from the offline run files with wandb's own reader (`wandb leet
inspect --json`), the PNG figures, and a W&B that fails to start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moe_vae.config import ConfigError, load_config
from moe_vae.train import train

WANDB = Path(sys.prefix) / "bin" / "wandb"


def _records(run_dir: Path) -> list[list[dict]]:
    """The records of each offline W&B run under run_dir, oldest first."""
    runs = []
    for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        out = subprocess.run(
            [str(WANDB), "leet", "inspect", "--json", str(f)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        runs.append([json.loads(x) for x in out.splitlines() if x.startswith("{")])
    return runs


def _cfg(tmp_path, name, *extra):
    return load_config(
        "configs/tiny.yaml",
        [f"--output.dir={tmp_path}", f"--output.name={name}", "--track.wandb=offline", *extra],
    )


def test_offline_run_files_hold_metrics_images_and_config(tmp_path, monkeypatch, repo):
    monkeypatch.chdir(repo)
    res = train(_cfg(tmp_path, "w", "--track.tags=[tiny, test]"), quiet=True)
    [records] = _records(res.run_dir)
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["project"] == "moe-vae" and run["display_name"] == "w"
    assert set(run["tags"]) == {"tiny", "test"}
    config = run["config"]["update"]
    assert config["model"]["num_experts"] == 4 and config["train"]["batch_size"] == 50
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    keys = set().union(*history)
    for key in (
        "loss/total",
        "loss/expected",
        "loss/balancing",
        "optim/lr",
        "samples_per_second",
        "time/step_seconds",
        "manager/entropy",
        "experts/in_use",
        "experts/dead",
        "eval/accuracy",
        "eval/nmi",
        "eval/ari",
        "data/bad_samples",
    ):
        assert key in keys, key
    for image in ("samples/expert_grid", "eval/confusion", "eval/reconstructions", "experts/usage"):
        assert f"{image}.path" in keys, image
        path = next(h[f"{image}.path"] for h in history if f"{image}.path" in h)
        assert list(res.run_dir.glob(f"wandb/offline-run-*/files/{path}")), path
    # The grid grows by one row per evaluation: two evaluations, two different images.
    grids = [h["samples/expert_grid.sha256"] for h in history if "samples/expert_grid.sha256" in h]
    assert len(grids) == 2 and grids[0] != grids[1]
    for png in (
        "expert_grid.png",
        "loss_curves.png",
        "expert_usage.png",
        "confusion.png",
        "reconstructions.png",
    ):
        assert (res.run_dir / png).is_file(), png


def test_resume_keeps_the_run_id(tmp_path, monkeypatch, repo):
    """Offline W&B ignores `resume`: a resumed run writes a second offline run directory with
    the same run id; `wandb sync` of both (oldest first) fills the one online run."""
    monkeypatch.chdir(repo)
    part = train(_cfg(tmp_path, "r", "--train.max_steps=12"), quiet=True)
    train(_cfg(tmp_path, "r", f"--train.resume={part.run_dir / 'checkpoint.pt'}"), quiet=True)
    runs = _records(part.run_dir)
    assert len(runs) == 2
    ids = [next(r["run"]["run_id"] for r in recs if r["type"] == "run") for recs in runs]
    assert ids[0] == ids[1]
    steps = [[r["history"]["step"]["num"] for r in recs if r["type"] == "history"] for recs in runs]
    assert max(steps[0]) <= 12 <= min(steps[1]) and max(steps[1]) == 20


def test_wandb_start_failure_does_not_stop_training(tmp_path, monkeypatch, repo, capsys):
    import wandb

    def broken_init(*args, **kwargs):
        raise wandb.errors.CommError("simulated: no route to the W&B server")

    monkeypatch.chdir(repo)
    monkeypatch.setattr(wandb, "init", broken_init)
    res = train(_cfg(tmp_path, "f", "--track.wandb=online"), quiet=True)
    assert res.final_eval["steps"] == 20
    err = capsys.readouterr().err
    assert err.count("W&B failed to start") == 1 and "training continues" in err
    assert not (res.run_dir / "wandb").exists()
    assert (res.run_dir / "metrics.jsonl").read_text().count('"event": "epoch"') == 2


def test_disabled_wandb_writes_no_wandb_files(tmp_path, monkeypatch, repo):
    monkeypatch.chdir(repo)
    res = train(_cfg(tmp_path, "d", "--track.wandb=disabled", "--train.max_steps=3"), quiet=True)
    assert not (res.run_dir / "wandb").exists() and (res.run_dir / "metrics.jsonl").exists()


@pytest.mark.parametrize("key", ["api_key", "token", "wandb_secret"])
def test_secrets_are_not_config_values(key):
    with pytest.raises(ConfigError, match=rf"track\.{key}: secrets are never config values"):
        load_config(None, [f"--track.{key}=abc"])
