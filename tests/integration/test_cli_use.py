"""Every command after training, end to end on a tiny trained checkpoint."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli_train import REPO, run_cli

from moe_vae import cli
from moe_vae.config import load_config
from moe_vae.evaluate.load import load_trained
from moe_vae.outpaths import why_not_writable
from moe_vae.train import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Trained with seed 1, not the default 0: what the commands must take from the run."""
    out = tmp_path_factory.mktemp("use")
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [f"--output.dir={out}", "--output.name=r", "--track.wandb=disabled", "--train.seed=1"],
    )
    return train(cfg, quiet=True).run_dir


def test_eval_matches_the_training_evaluation(run_dir, tmp_path):
    out = tmp_path / "m.json"
    proc = run_cli("eval", "--checkpoint", str(run_dir), "--limit", "200", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(out.read_text())
    trained = json.loads((run_dir / "eval.json").read_text())
    for key in ("accuracy", "nmi", "ari", "experts_in_use", "neg_elbo"):
        assert metrics[key] == pytest.approx(trained[key], rel=1e-5), key
    assert json.loads(proc.stdout)["num_samples"] == 200


def test_eval_noise_defaults_to_the_runs_seed(run_dir, capsys):
    """Without --seed, eval draws the latent noise from the run's train.seed, as the trainer's
    evaluation did: on the run's test set (tiny.yaml's data.test_limit, 200) its neg_elbo is
    eval.json's exactly. It used to be seed 0's, 461.867 against 461.838 for this run."""
    trained = json.loads((run_dir / "eval.json").read_text())["neg_elbo"]

    def neg_elbo(*seed: str) -> float:
        assert cli.main(["eval", "--checkpoint", str(run_dir), "--limit", "200", *seed]) == 0
        return json.loads(capsys.readouterr().out)["neg_elbo"]

    assert neg_elbo() == trained
    assert neg_elbo("--seed", "0") != trained  # the seed does show in the metric


def test_bf16_true_run_evaluates_as_trained(tmp_path):
    """Weights stored in bf16: loaded in bf16, evaluated as the trainer did; images in fp32."""
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"--output.dir={tmp_path}",
            "--output.name=b",
            "--track.wandb=disabled",
            "--train.precision=bf16-true",
        ],
    )
    run = train(cfg, quiet=True).run_dir
    model, _ = load_trained(run)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = tmp_path / "m.json"
    proc = run_cli("eval", "--checkpoint", str(run), "--limit", "200", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    metrics, trained = json.loads(out.read_text()), json.loads((run / "eval.json").read_text())
    for key in ("accuracy", "nmi", "neg_elbo"):
        assert metrics[key] == pytest.approx(trained[key], rel=1e-5), key
    npy = str(tmp_path / "s.npy")
    proc = run_cli("sample", "--checkpoint", str(run), "--mixture", "--n", "4", "--out", npy)
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "s.npy").dtype == np.float32


def test_sample_from_an_expert_and_from_the_mixture(run_dir, tmp_path):
    proc = run_cli(
        "sample",
        "--checkpoint",
        str(run_dir),
        "--expert",
        "2",
        "--n",
        "12",
        "--out",
        str(tmp_path / "e.npy"),
    )
    assert proc.returncode == 0, proc.stderr
    images = np.load(tmp_path / "e.npy")
    assert images.shape == (12, 1, 28, 28) and images.min() >= 0 and images.max() <= 1
    model, _ = load_trained(run_dir)
    z = torch.randn(12, model.cfg.z_dim, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(images.reshape(12, -1), model.generate(z, 2).numpy(), rtol=1e-5)
    proc = run_cli(
        "sample",
        "--checkpoint",
        str(run_dir),
        "--mixture",
        "--n",
        "25",
        "--out",
        str(tmp_path / "m.png"),
    )
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "m.png").size == (10 * 28, 3 * 28)


def test_sample_expert_under_a_hierarchy_is_a_leaf(tmp_path, capsys):
    """Under model.hierarchy=[2, 3], --expert 4 decodes with leaf 4, the manager's path (1, 1):
    top-level expert 1, its second sub-expert (leaves are row-major). The help says what K
    indexes, which it did not."""
    from moe_vae.commands import run_export
    from moe_vae.model.mixture import MixtureOfVAEs

    tiny = REPO / "configs" / "tiny.yaml"
    cfg = load_config(tiny, ["--model.hierarchy=[2,3]", "--model.num_experts=6"])
    torch.manual_seed(0)
    model = MixtureOfVAEs(cfg.model, (1, 28, 28)).eval()
    x = torch.rand(3, 784)
    path_1_1 = model.manager.top(x).log_softmax(-1)[:, 1]
    path_1_1 = path_1_1 + model.manager.sub[0](x).log_softmax(-1)[1, :, 1]
    torch.testing.assert_close(model.manager(x)[:, 4], path_1_1)
    weights = tmp_path / "h.safetensors"
    run_export(model, cfg, weights, None)
    out = tmp_path / "leaf.npy"
    command = ["sample", "--checkpoint", str(weights), "--expert", "4", "--n", "5"]
    assert cli.main([*command, "--out", str(out)]) == 0
    z = torch.randn(5, cfg.model.z_dim, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(np.load(out).reshape(5, -1), model.generate(z, 4), rtol=1e-5)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["sample", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(under model.hierarchy: a leaf, not a top-level expert; see below)" in help_text
    assert "with [10, 3] top-level expert t's leaves are 3t, 3t+1 and 3t+2" in help_text


def test_assign_and_score_tables(run_dir, tmp_path):
    proc = run_cli(
        "assign",
        "--checkpoint",
        str(run_dir / "checkpoint.pt"),
        "--limit",
        "30",
        "--out",
        str(tmp_path / "a.csv"),
    )
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((tmp_path / "a.csv").open()))
    assert len(rows) == 30 and rows[0]["key"] == "test-00000000"
    for row in rows:
        probs = [float(row[f"p_{e}"]) for e in range(4)]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert int(row["cluster"]) == int(np.argmax(probs))
    proc = run_cli(
        "score", "--checkpoint", str(run_dir), "--limit", "30", "--out", str(tmp_path / "s.csv")
    )
    assert proc.returncode == 0, proc.stderr
    scores = [float(r["nll"]) for r in csv.DictReader((tmp_path / "s.csv").open())]
    assert len(scores) == 30 and all(np.isfinite(scores))


def test_score_ranks_a_foreign_input_above_digits(run_dir, tmp_path):
    """Scores through the shard path: MNIST digits vs. the same images inverted."""
    from moe_vae.commands import input_set, per_input

    model, cfg = load_trained(run_dir)
    images, _, _ = input_set(cfg, "test", None, 100, model.image_shape)
    _, nll_digits = per_input(model, cfg, images, 0)
    _, nll_inverted = per_input(model, cfg, 255 - images, 0)
    assert np.median(nll_inverted) > np.median(nll_digits)


def test_mixture_samples_from_a_safetensors_file_are_the_checkpoints(run_dir, tmp_path, capsys):
    """The last epoch's mixing weights travel in the metadata of an export and of the run's
    model.safetensors: --mixture draws the same experts, so the same images, from any of the
    three files (from a .safetensors it drew from a uniform prior)."""
    from safetensors import safe_open

    from moe_vae.train.checkpoint import load_checkpoint

    exported = tmp_path / "mix.safetensors"
    assert cli.main(["export", "--checkpoint", str(run_dir), "--out", str(exported)]) == 0
    prior = load_checkpoint(run_dir / "checkpoint.pt")["epochs"][-1]["experts/importance"]
    assert not np.allclose(prior, 0.25)  # else a uniform prior would pass
    files = {
        "pt": run_dir / "checkpoint.pt",
        "export": exported,
        "run": run_dir / "model.safetensors",
    }
    images = {}
    for name, path in files.items():
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                assert json.loads(f.metadata()["expert_prior"]) == prior, name
        out = tmp_path / f"{name}.npy"
        command = ["sample", "--checkpoint", str(path), "--mixture", "--n", "40", "--seed", "3"]
        assert cli.main([*command, "--out", str(out)]) == 0
        images[name] = np.load(out)
    capsys.readouterr()
    np.testing.assert_array_equal(images["export"], images["pt"])
    np.testing.assert_array_equal(images["run"], images["pt"])


def test_a_safetensors_file_without_mixing_weights(run_dir, tmp_path, capsys):
    """An export made before the mixing weights were kept samples the mixture uniformly, as
    before; metadata that is not a list of weights is one line naming the file."""
    from safetensors.torch import load_file, save_file

    from moe_vae.commands import expert_prior, run_export
    from moe_vae.train.checkpoint import weights_metadata

    model, cfg = load_trained(run_dir)
    older = tmp_path / "older.safetensors"
    run_export(model, cfg, older, None)
    assert expert_prior(older, 4).tolist() == [0.25] * 4
    broken = tmp_path / "broken.safetensors"
    metadata = {**weights_metadata(cfg, model.image_shape, None), "expert_prior": "{oops"}
    save_file(load_file(older), broken, metadata=metadata)
    out = tmp_path / "s.npy"
    assert cli.main(["sample", "--checkpoint", str(broken), "--mixture", "--out", str(out)]) == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and f"'{broken}': its expert_prior" in stderr
    assert not out.exists()


def test_export_loads_without_deepspeed(run_dir, tmp_path):
    out = tmp_path / "mix.safetensors"
    proc = run_cli("export", "--checkpoint", str(run_dir / "checkpoint.pt"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    a, _ = load_trained(out)
    b, _ = load_trained(run_dir / "checkpoint.pt")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["eval", "--checkpoint", "/nonexistent/run"], "checkpoint '/nonexistent/run' not found"),
        (
            ["sample", "--checkpoint", "RUN", "--expert", "9", "--out", "x.png"],
            "expert index 9 out of range",
        ),
        (
            ["eval", "--checkpoint", "RUN", "--config", "configs/mnist_seed.yaml"],
            "is of another model shape (model.num_experts: 4 in the checkpoint, 10 asked",
        ),
        (["assign", "--checkpoint", "RUN", "--out", "x.txt"], "expected a .csv or .parquet"),
        (["export", "--checkpoint", "RUN", "--out", "x.pt"], "expected a .safetensors"),
        (["eval", "--checkpoint", "RUN", "--device", "cdua"], "--device 'cdua': expected cpu"),
        (
            ["score", "--checkpoint", "RUN", "--device", "cuda:x", "--out", "x.csv"],
            "--device 'cuda:x': expected cpu, cuda or cuda:N",
        ),
    ],
)
def test_clear_errors(run_dir, tmp_path, args, expected):
    args = [str(run_dir) if a == "RUN" else a for a in args]
    args = [str(tmp_path / a) if a.startswith("x.") else a for a in args]
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["eval", "--out", "NODIR/m.json"], "NODIR/m.json': directory 'NODIR' does not exist"),
        (["eval", "--out", "RUN"], "RUN' is a directory: expected a file name"),
        (["eval", "--out", "FILE/m.json"], "FILE/m.json': 'FILE' is not a directory"),
        (["assign", "--out", "NODIR/a.csv"], "directory 'NODIR' does not exist"),
        (["score", "--out", "RUN"], "RUN' is a directory"),
        (["sample", "--mixture", "--out", "NODIR/s.png"], "directory 'NODIR' does not exist"),
        (["sample", "--expert", "0", "--out", "NODIR/s.npy"], "directory 'NODIR' does not exist"),
        (["sample", "--mixture", "--out", "RUN"], "RUN' is a directory"),
        (["sample", "--mixture", "--out", "s.jpg"], "expected a .png or .npy file name"),
        (["export", "--out", "NODIR/m.safetensors"], "directory 'NODIR' does not exist"),
        (["export", "--out", "RUN"], "RUN' is a directory"),
    ],
)
def test_bad_out_is_one_line_before_any_work(run_dir, tmp_path, capsys, args, expected):
    """--out is checked before the model is loaded: a typo there used to be a traceback after
    every metric was computed. Nothing is written, the run directory is left as it was. (The
    command line in this process: refused before any work, so a subprocess would only add its
    start-up time.)"""
    (tmp_path / "FILE").write_text("keep me")
    names = {"RUN": str(run_dir), "NODIR": str(tmp_path / "nodir"), "FILE": str(tmp_path / "FILE")}

    def real(text: str) -> str:
        for name, path in names.items():
            text = text.replace(name, path)
        return text

    def out(text: str) -> str:  # a bare file name lands in tmp_path
        return str(tmp_path / text) if "." in text and "/" not in text else real(text)

    before = sorted(p.name for p in run_dir.iterdir())
    code = cli.main([args[0], "--checkpoint", str(run_dir), *args[1:-1], out(args[-1])])
    stdout, stderr = capsys.readouterr()
    assert code == 2 and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert f"--out '{out(args[-1])}'" in stderr and real(expected) in stderr
    assert stdout == ""  # refused before any work (eval prints its metrics first)
    assert sorted(p.name for p in run_dir.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]
    assert (tmp_path / "FILE").read_text() == "keep me"


def test_out_in_a_directory_that_refuses_files_is_refused_up_front(run_dir, capsys):
    """/proc takes no new files, even from root, whom permission bits (os.access) let
    through: the check creates a file there, so it refuses before any work."""
    code = cli.main(["eval", "--checkpoint", str(run_dir), "--out", "/proc/m.json"])
    stdout, stderr = capsys.readouterr()
    assert code == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1
    assert "--out '/proc/m.json': directory '/proc' is not writable (" in stderr


@pytest.mark.skipif(
    why_not_writable(Path("/dev")) is not None, reason="/dev takes files only from root"
)
def test_out_that_cannot_be_written_keeps_the_metrics(run_dir, capsys):
    """What no check foresees (a full device: /dev/full refuses every write) is one line
    naming --out, and eval's metrics are on stdout all the same."""
    code = cli.main(["eval", "--checkpoint", str(run_dir), "--limit", "50", "--out", "/dev/full"])
    stdout, stderr = capsys.readouterr()
    assert code == 2 and "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert "--out '/dev/full': cannot write it: No space left on device" in stderr
    assert json.loads(stdout)["num_samples"] == 50


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal where there is no GPU")
@pytest.mark.parametrize("command", ["eval", "sample", "assign"])
def test_cuda_without_a_gpu_is_a_clear_error(run_dir, tmp_path, command):
    extra = {
        "eval": [],
        "sample": ["--mixture", "--out", str(tmp_path / "s.png")],
        "assign": ["--out", str(tmp_path / "a.csv")],
    }[command]
    proc = run_cli(command, "--checkpoint", str(run_dir), "--device", "cuda", *extra)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "--device cuda: no CUDA device is available here" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_truncated_checkpoint_is_a_clear_error(run_dir, tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes((run_dir / "checkpoint.pt").read_bytes()[:5000])
    proc = run_cli("eval", "--checkpoint", str(bad))
    assert proc.returncode == 2 and "truncated or not a moe-vae checkpoint" in proc.stderr
