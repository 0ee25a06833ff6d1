"""End to end: the README's train command on the tiny config, and clean CLI errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from moe_vae.config import load_config
from moe_vae.config.schema import OutputConfig
from moe_vae.train.run_dir import RunDirError, check_output_dir

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env['PATH']}"
    return env


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV / "bin" / "moe-vae"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )


def test_readme_train_command_on_tiny_config(tmp_path):
    """`make train` (the README's command) with CONFIG/ARGS pointing at the tiny recipe.

    `-o` tells make the venv stamp is up to date: this test runs inside the venv `make test` made.
    """
    readme = (REPO / "README.md").read_text()
    assert "make train" in readme and "make test" in readme
    out_dir = tmp_path / "runs"
    proc = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-o",
            f"{VENV}/.installed",
            "train",
            f"VENV={VENV}",
            "CONFIG=configs/tiny.yaml",
            f"ARGS=--output.dir={out_dir} --output.name=t --quiet",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr
    run = out_dir / "t"
    assert f"results in {run}" in proc.stdout
    assert "test clustering accuracy" in proc.stdout
    # tiny.yaml: 2 epochs of 500 samples; the rate is the loop's own
    trained = re.search(r"trained 2 epochs in ([\d.]+) s: ([\d,]+) samples/s", proc.stdout)
    assert trained and float(trained[1]) > 0 and int(trained[2].replace(",", "")) > 0

    for name in (
        "config.yaml",
        "metrics.jsonl",
        "eval.json",
        "expert_grid.png",
        "loss_curves.png",
        "model.safetensors",
    ):
        assert (run / name).is_file(), name
    # The resolved config reloads to the config the run used.
    assert load_config(run / "config.yaml") == load_config(
        REPO / "configs" / "tiny.yaml", [f"--output.dir={out_dir}", "--output.name=t"]
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = [r.get("event") for r in records]
    assert events[0] == "start" and events[-1] == "final" and events.count("epoch") == 2
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == [5, 10, 15, 20]  # log_every 5, 10 steps/epoch
    ev = json.loads((run / "eval.json").read_text())
    for key in ("accuracy", "many_to_one_accuracy", "nmi", "ari", "experts_in_use", "neg_elbo"):
        assert key in ev, key
    assert 0.0 <= ev["accuracy"] <= 1.0 and ev["num_samples"] == 200
    # The seed's figure: 2 rows (epochs) x 4 columns (experts) of 28x28 tiles, plus axes.
    grid = mpimg.imread(run / "expert_grid.png")
    assert grid.shape[0] > 56 and grid.shape[1] > 4 * 28


def test_bad_override_is_one_line_and_writes_nothing(tmp_path):
    proc = run_cli(
        "train",
        "--config",
        "configs/tiny.yaml",
        "--model.num_experts=0",
        f"--output.dir={tmp_path}",
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "model.num_experts" in lines[0] and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--config", "nope.yaml"], "config file 'nope.yaml' not found"),
        (["--config", "configs/tiny.yaml", "--train.epochs=0"], "train.epochs"),
        (["--config", "configs/tiny.yaml", "--epochs=3"], "unknown option --epochs"),
        (
            ["--config", "configs/tiny.yaml", "--data.source=dir", "--data.root=/nonexistent"],
            "is not a directory",
        ),
        (
            [
                "--config",
                "configs/tiny.yaml",
                "--data.name=shards",
                "--data.train_shards=/no/x.tar",
            ],
            "matches nothing",
        ),
        (  # known once the data is read (its image size): --quiet, no shard-cache progress bar
            [
                "--config",
                "configs/tiny.yaml",
                "--model.expert=conv",
                "--model.conv_channels=[4,4,4,4,4]",
                "--quiet",
            ],
            "model.conv_channels=[4, 4, 4, 4, 4] has 5 stride-2 layers, too many for 28x28",
        ),
    ],
)
def test_cli_errors_are_clean(args, expected, tmp_path):
    proc = run_cli("train", *args, f"--output.dir={tmp_path}", timeout=120)
    assert proc.returncode == 2
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # bad input is caught before a run directory exists


def test_existing_run_directory_is_overwritten_only_when_asked(tmp_path):
    run = tmp_path / "keep"
    run.mkdir()
    (run / "metrics.jsonl").write_text("precious\n")
    proc = run_cli(
        "train", "--config", "configs/tiny.yaml", f"--output.dir={tmp_path}", "--output.name=keep"
    )
    assert proc.returncode == 2 and "already holds outputs" in proc.stderr
    assert (run / "metrics.jsonl").read_text() == "precious\n"
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
    # ... unless asked to: the old outputs go and the new run's take their place (the flag
    # was ignored before)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step-9.pt").write_text("stale")
    proc = run_cli(
        "train",
        "--config",
        "configs/tiny.yaml",
        f"--output.dir={tmp_path}",
        "--output.name=keep",
        "--output.overwrite=true",
        "--train.max_steps=2",
        "--track.wandb=disabled",
    )
    assert proc.returncode == 0, proc.stderr
    assert "precious" not in (run / "metrics.jsonl").read_text()
    assert not (run / "checkpoints" / "step-9.pt").exists()
    assert (run / "model.safetensors").exists()


@pytest.mark.parametrize("flag", ["--output.overwrite=true", "--train.resume=auto"])
def test_a_folder_that_is_not_a_run_is_never_deleted(tmp_path, flag):
    """overwrite, and resume=auto with nothing to resume, replace a run directory; a folder of
    something else with the run's name is refused, everything in it kept."""
    folder = tmp_path / "mine"
    (folder / "keep").mkdir(parents=True)
    (folder / "precious.txt").write_text("important")
    proc = run_cli(
        "train",
        "--config",
        "configs/tiny.yaml",
        f"--output.dir={tmp_path}",
        "--output.name=mine",
        flag,
        "--track.wandb=disabled",
    )
    assert proc.returncode == 2 and "is not a moe-vae run directory" in proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["keep", "precious.txt"]
    assert (folder / "precious.txt").read_text() == "important"


@pytest.mark.parametrize("name", [".", "..", "a/b", "../up"])
def test_output_name_is_one_folder(tmp_path, name):
    """output.name '.' with overwrite would have deleted output.dir and every run in it."""
    proc = run_cli(
        "train",
        "--config",
        "configs/tiny.yaml",
        f"--output.dir={tmp_path}",
        f"--output.name={name}",
        "--output.overwrite=true",
        "--print-config",
    )
    assert proc.returncode == 2 and "must be one folder name inside output.dir" in proc.stderr


def test_print_config_and_help():
    proc = run_cli(
        "train", "--config", "configs/mnist_seed.yaml", "--train.epochs=3", "--print-config"
    )
    assert proc.returncode == 0
    assert "epochs: 3" in proc.stdout and "num_experts: 10" in proc.stdout
    helptext = run_cli("train", "--help").stdout
    assert "--train.epochs=3" in helptext and "founding recipe" in helptext
    mod = subprocess.run(
        [sys.executable, "-m", "moe_vae", "--version"], capture_output=True, text=True, timeout=60
    )
    assert mod.returncode == 0 and mod.stdout.startswith("moe-vae ")


def test_unwritable_output_directory_is_one_clear_line(tmp_path):
    """output.dir is a regular file (permission bits do not stop root, a file in the way does):
    one line naming it, exit 2, before any data is prepared, the file untouched."""
    blocker = tmp_path / "outputs"
    blocker.write_text("not a directory\n")
    proc = run_cli(
        "train", "--config", "configs/tiny.yaml", f"--output.dir={blocker}", "--output.name=r"
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "output.dir" in proc.stderr and f"{str(blocker)!r} is not a directory" in proc.stderr
    assert blocker.read_text() == "not a directory\n"


def test_output_directory_under_a_file_system_that_refuses_files():
    """/proc takes no new files even from root, whom the permission bits let through: the
    check creates one, so output.dir there is refused before any work, naming the reason."""
    with pytest.raises(RunDirError, match=r"output.dir '/proc/runs' cannot be created: '/proc' "):
        check_output_dir(OutputConfig(dir="/proc/runs"))


@pytest.mark.parametrize("where", ["data.cache_dir", "MOE_VAE_CACHE", "/proc"])
def test_unusable_shard_cache_is_one_clear_line(where, tmp_path, monkeypatch):
    """The MNIST shard cache in a file, or where no directory can be made: one line naming the
    setting that put it there, before a run directory exists, the file untouched."""
    blocker = tmp_path / "afile"
    blocker.write_text("keep me\n")
    args = ["--config", "configs/tiny.yaml", f"--output.dir={tmp_path / 'runs'}", "--quiet"]
    if where == "MOE_VAE_CACHE":
        monkeypatch.setenv("MOE_VAE_CACHE", str(blocker))
        setting = f"MOE_VAE_CACHE {str(blocker)!r}: cannot write MNIST's shard cache"
    else:
        cache = "/proc/moe_vae_cache" if where == "/proc" else str(blocker)
        args.append(f"--data.cache_dir={cache}")
        setting = f"data.cache_dir {cache!r}: cannot write MNIST's shard cache"
    proc = run_cli("train", *args, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and setting in proc.stderr
    assert blocker.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
