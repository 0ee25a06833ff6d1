"""Multi-process tests through the real `deepspeed` launcher on CPU (DS_ACCELERATOR=cpu, gloo).

Every launch has a hard timeout, so a hang fails fast instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_vae.model.mixture import MixtureOfVAEs
from moe_vae.track.jsonl import step_values
from moe_vae.train.checkpoint import load_checkpoint

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BIN = Path(sys.prefix) / "bin"
TIMEOUT = 1500  # the first launch may compile DeepSpeed's CPU comm op: minutes on 2 busy cores
pytestmark = pytest.mark.timeout(3000)
TRAIN_TINY = ("train", "--config", "configs/tiny.yaml")  # moe-vae's arguments: the tiny recipe


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_lines(stderr: str) -> list[str]:
    """The command line's error lines (each rank's, if several said one)."""
    return [line for line in stderr.splitlines() if line.startswith("moe-vae: error:")]


def start_deepspeed(n: int, script: str, *args: str, port: int | None = None) -> subprocess.Popen:
    """The real `deepspeed` launcher in its own process group (so the whole job can be killed)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    cmd = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        str(n),
        "--master_port",
        str(port or _port()),
        script,
        *args,
    ]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def deepspeed(n: int, script: str, *args: str, timeout: int = TIMEOUT, port: int | None = None):
    """Run the launcher to the end; on a timeout its whole process group is killed, so no rank
    outlives the test."""
    proc = start_deepspeed(n, script, *args, port=port)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize(
    ("world", "zero", "ep", "top_k", "clip", "precision"),
    [
        (2, 0, 0, 0, 0.0, "fp32"),
        (4, 0, 0, 0, 0.05, "fp32"),
        (2, 0, 0, 0, 0.05, "bf16"),
        (2, 1, 0, 0, 0.0, "fp32"),
        (4, 2, 0, 0, 0.05, "fp32"),
        (4, 1, 2, 0, 0.05, "fp32"),
        (2, 0, 0, 2, 0.0, "fp32"),
        (4, 2, 0, 1, 0.0, "fp32"),
    ],
    ids=[
        "2proc-zero0",
        "4proc-zero0-clip",
        "2proc-zero0-bf16-clip",
        "2proc-zero1",
        "4proc-zero2-clip",
        "4proc-zero1-ep2-clip",
        "2proc-zero0-top2",
        "4proc-zero2-top1",
    ],
)
def test_matches_single_process_model(tmp_path, world, zero, ep, top_k, clip, precision):
    """Dense and top-k routing over all-to-all: global loss at every step, every gradient
    (ZeRO 0) and every parameter after 3 Adam steps equal the single-process model holding all
    experts; with optim.grad_clip, clipped to the whole model's norm as torch clips it there
    (ZeRO 0: the trainer's clip; ZeRO 1/2: DeepSpeed's). ZeRO 0's own clipping took the mean
    of the ranks' norms, an update ~1.4x too large on 2 expert shards, and under bf16 left the
    experts' gradients out of the norm (bf16: within bf16's rounding of the fp32 model)."""
    out = tmp_path / "report.json"
    proc = deepspeed(
        world,
        str(HERE / "parity_worker.py"),
        f"--zero-config={REPO}/configs/deepspeed/zero{zero}.json",
        f"--ep-size={ep}",
        f"--top-k={top_k}",
        f"--clip={clip}",
        f"--precision={precision}",
        f"--out={out}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["world"] == world and report["ep"] == (ep or world)
    if clip and zero == 0:  # the trainer's clip measured the whole model's norm
        assert report["norm_diff"] < (1e-5 if precision == "fp32" else 2e-3)
    if precision == "bf16":  # the worker's bf16 tolerances held
        return
    assert report["loss_diff"] < 1e-5 and report["param_diff"] < 1e-4
    if zero == 0:
        assert report["grad_diff"] < 1e-4


def test_train_cli_checkpoint_and_reshard(tmp_path):
    """`deepspeed ... moe-vae train` on 2 ranks (ep 2) writes a whole-model checkpoint and
    safetensors; the checkpoint gives the same loss on 1 and 4 ranks, and resumes on 4."""
    run = tmp_path / "r"
    proc = deepspeed(
        2,
        str(BIN / "moe-vae"),
        *TRAIN_TINY,
        f"--output.dir={tmp_path}",
        "--output.name=r",
        "--train.batch_size=100",
        "--train.checkpoint_every=5",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("results in") == 1  # only rank 0 reports
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["world_size"] == 2 and metrics[0]["ep_size"] == 2
    assert len(list(run.glob("wandb/offline-run-*"))) == 1  # only rank 0 tracks

    # The exported weights load on one CPU process, without DeepSpeed.
    ckpt = load_checkpoint(run / "checkpoint.pt")
    weights = load_file(run / "model.safetensors")
    from moe_vae.config import load_config

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    single = MixtureOfVAEs(cfg.model, (1, 28, 28))
    single.load_state_dict(weights)
    assert all(torch.equal(weights[k], ckpt["model"][k]) for k in weights)

    losses = {}
    for n in (1, 2, 4):
        out = tmp_path / f"loss{n}.json"
        proc = deepspeed(
            n, str(HERE / "reshard_worker.py"), f"--checkpoint={run}/checkpoint.pt", f"--out={out}"
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        losses[n] = json.loads(out.read_text())["loss"]
    assert losses[1] == pytest.approx(losses[2], rel=1e-6)
    assert losses[4] == pytest.approx(losses[2], rel=1e-6)

    # Resume the 2-rank run on 4 ranks (experts re-sharded); training continues to the end.
    proc = deepspeed(
        4,
        str(BIN / "moe-vae"),
        *TRAIN_TINY,
        f"--output.dir={tmp_path}",
        "--output.name=r",
        "--train.batch_size=100",
        "--train.epochs=3",
        f"--train.resume={run}/checkpoint.pt",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    resumed = next(r for r in events if r.get("event") == "resume")
    assert resumed["world_size"] == 4 and resumed["step"] == 10  # 2 epochs of 500 / 100
    assert events[-1]["event"] == "final" and events[-1]["eval/epochs_run"] == 3
    assert len(list(run.glob("wandb/offline-run-*"))) == 2  # the resumed run: same id, new dir


# DeepSpeed engine knobs -> the optimizer wrapper DeepSpeed picks under bf16.
BF16_WRAPPERS = {
    "zero0": {"zero_optimization": {"stage": 0}},  # FP16_UnfusedOptimizer: per-parameter copies
    "zero1": {"zero_optimization": {"stage": 1}},  # ZeRO's: flat partitions
    "zero1-fp32-accum": {  # BF16_Optimizer: flat partitions of its own
        "zero_optimization": {"stage": 1},
        "data_types": {"grad_accum_dtype": "fp32"},
    },
}


@pytest.mark.parametrize("knobs", sorted(BF16_WRAPPERS))
def test_bf16_resume_keeps_the_fp32_master_weights(tmp_path, knobs):
    """DeepSpeed's bf16 on 2 CPU ranks: the module's weights are bf16 and Adam steps fp32
    master copies, kept by one of three wrappers (BF16_WRAPPERS). The checkpoint keeps the
    masters, so rolling back to step 10 and going on ends bit-identical to the uninterrupted
    run (from the rounded bf16 weights alone it would not; ZeRO 0's Adam moments and all of
    BF16_Optimizer's state were once not saved at all), in the run's own directory, not its
    checkpoints/ folder."""
    ds_json = tmp_path / f"{knobs}.json"
    ds_json.write_text(json.dumps(BF16_WRAPPERS[knobs]))
    common = [
        *TRAIN_TINY,
        f"--output.dir={tmp_path}",
        "--train.batch_size=100",
        "--train.precision=bf16",
        f"--parallel.deepspeed_config={ds_json}",
        "--track.wandb=disabled",
        "--quiet",
    ]
    proc = deepspeed(
        2,
        str(BIN / "moe-vae"),
        *common,
        "--output.name=whole",
        "--train.epochs=3",
        "--train.checkpoint_every=10",
        "--train.keep_checkpoints=5",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    midway = tmp_path / "whole" / "checkpoints" / "step-000000010.pt"
    ckpt = load_checkpoint(midway)
    assert {v.dtype for v in ckpt["model"].values()} == {torch.bfloat16}
    masters = [state["fp32_master"] for state in ckpt["optim"].values()]
    assert len(masters) == len(ckpt["model"])  # every parameter's, Adam's moments beside it
    assert all(m.dtype == torch.float32 for m in masters)
    assert all("exp_avg_sq" in state for state in ckpt["optim"].values())
    # the masters hold what bf16 cannot: not all of them are bf16 values
    assert any(not torch.equal(m, m.bfloat16().float()) for m in masters)

    # Roll back to the kept step-10 checkpoint: the run goes on in its own directory.
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    proc = deepspeed(
        2, str(BIN / "moe-vae"), *common, "--train.epochs=3", f"--train.resume={midway}"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (midway.parent / "model.safetensors").exists()  # not in checkpoints/
    resumed = load_file(tmp_path / "whole" / "model.safetensors")
    for name, w in whole.items():
        assert torch.equal(resumed[name], w), name


@pytest.mark.parametrize(
    ("precision", "knobs"),
    # per-parameter fp32 copies, and flat fp32 partitions (fp32 ZeRO 1/2 steps the same
    # partitions, without a master apart from the module)
    [("bf16", "zero0"), ("bf16", "zero1")],
    ids=["bf16-zero0", "bf16-zero1"],
)
def test_revival_edits_only_the_revived_rows(tmp_path, precision, knobs):
    """Reviving experts on 2 ranks (ep 2, a donor on the other rank) under DeepSpeed: the dead
    experts' master weights and Adam moments become their donors', the manager's logit rows
    split, and nothing else changes by a bit; in particular bf16's fp32 masters are not
    refreshed from the rounded module (which once rounded the whole model at every revival)."""
    ds_json = tmp_path / "knobs.json"
    ds_json.write_text(json.dumps(BF16_WRAPPERS.get(knobs, {"zero_optimization": {"stage": 2}})))
    proc = deepspeed(
        2,
        str(HERE / "revival_worker.py"),
        f"--ds-config={ds_json}",
        f"--precision={precision}",
        f"--outdir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] and report["n_failed"] == 0 and report["stepped"]


def test_fp16_loss_scaler_finds_its_level_and_resumes_exactly(tmp_path):
    """DeepSpeed's fp16 under ZeRO 1 on 2 CPU ranks (fp16_worker.py: the CPU accelerator made
    to claim fp16). From a loss scale of 2^24 the gradients overflow, and DeepSpeed skips steps
    while it lowers the scale: those are the scaler's skips, counted apart, not failed steps
    (more of them in a row than max_nonfinite_in_row=3 would stop the run). The scaler's state
    is in the checkpoint: rolled back to step 10, the run ends bit-identical (from the initial
    scale it would overflow all over again)."""
    knobs = tmp_path / "fp16.json"
    knobs.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 1},
                "fp16": {"initial_scale_power": 24, "loss_scale_window": 5},
            }
        )
    )
    common = [
        *TRAIN_TINY,
        f"--output.dir={tmp_path}",
        "--output.name=whole",
        "--train.batch_size=100",
        "--train.precision=fp16",
        f"--parallel.deepspeed_config={knobs}",
        "--train.max_nonfinite_in_row=3",
        "--train.epochs=4",
        "--track.wandb=disabled",
        "--quiet",
    ]
    worker = str(HERE / "fp16_worker.py")
    saving = ["--train.checkpoint_every=10", "--train.keep_checkpoints=5"]
    proc = deepspeed(2, worker, *common, *saving)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "whole"
    epochs = [
        r for r in map(json.loads, (run / "metrics.jsonl").open()) if r.get("event") == "epoch"
    ]
    assert epochs[-1]["train/loss_scale_skipped"] > 3 and epochs[-1]["train/nonfinite_skipped"] == 0
    assert epochs[-1]["optim/loss_scale"] < 2**24
    midway = run / "checkpoints" / "step-000000010.pt"
    assert load_checkpoint(midway)["loss_scaler"]["cur_scale"] < 2**24
    whole = load_file(run / "model.safetensors")
    assert {w.dtype for w in whole.values()} == {torch.float16}

    proc = deepspeed(2, worker, *common, f"--train.resume={midway}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = load_file(run / "model.safetensors")
    for name, w in whole.items():
        assert torch.equal(resumed[name], w), name
    again = [
        r for r in map(json.loads, (run / "metrics.jsonl").open()) if r.get("event") == "epoch"
    ]
    assert again[-1]["train/loss_scale_skipped"] == epochs[-1]["train/loss_scale_skipped"]


def test_a_failing_rank_ends_the_job(tmp_path):
    """One rank's data is all bad: it raises, and the launcher ends the whole job non-zero
    (the other rank, blocked in a collective, must not hang)."""
    sys.path.insert(0, str(REPO / "tests" / "unit"))
    from shard_helpers import write_tiny

    from moe_vae.data.records import npy_bytes

    pattern, _, _ = write_tiny(tmp_path / "s", n=200, per_shard=100)  # 2 shards of 6x5
    bad = tmp_path / "s" / "train-000001.tar"
    import io
    import tarfile

    with tarfile.open(bad, "w") as tar:  # the same sample count, every image the wrong shape
        for i in range(100):
            data = npy_bytes(torch.zeros(7, 7, dtype=torch.uint8).numpy())
            info = tarfile.TarInfo(f"bad{i:04d}.npy")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    t0 = time.monotonic()
    proc = deepspeed(
        2,
        str(BIN / "moe-vae"),
        *TRAIN_TINY,
        "--data.name=shards",
        f"--data.train_shards={pattern}",
        "--data.train_limit=null",
        "--data.loader=stream",
        "--data.num_workers=0",
        "--data.test_limit=null",
        f"--output.dir={tmp_path}",
        "--quiet",
        timeout=300,
    )
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 240
    # One line from the rank that met the bad data, one from the rank whose peer went away;
    # no traceback of a collective that lost its peer.
    errors = error_lines(proc.stderr)
    assert len(errors) == 2, proc.stderr[-3000:]
    bad_data = [e for e in errors if "data.max_bad_fraction" in e]
    assert len(bad_data) == 1 and bad_data[0].startswith("moe-vae: error: rank "), errors
    bad_rank = bad_data[0].split()[3].rstrip(":")
    other = f"rank {1 - int(bad_rank)}"
    assert (
        f"moe-vae: error: {other}: another rank of the job stopped"
        in errors[1 - errors.index(bad_data[0])]
    )
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("case", ["run-dir-taken", "bad-config", "bad-cache"], ids=lambda c: c)
def test_bad_input_of_a_job_is_one_line(tmp_path, case):
    """Input every rank reads alike (config) or rank 0 alone handles (the run directory, the
    MNIST cache): one line from rank 0, exit 2, no rank left to die in a collective with a
    traceback, and the existing run untouched."""
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "metrics.jsonl").write_text("{}\n")
    extra = {
        "run-dir-taken": ["--output.name=taken"],
        "bad-config": ["--train.epochs=0"],
        "bad-cache": [f"--data.cache_dir={taken / 'metrics.jsonl'}"],  # a file
    }[case]
    proc = deepspeed(
        2,
        str(BIN / "moe-vae"),
        *TRAIN_TINY,
        f"--output.dir={tmp_path}",
        "--track.wandb=disabled",
        *extra,
        timeout=300,
    )
    assert proc.returncode == 2
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr[-3000:]
    assert {
        "run-dir-taken": "already holds outputs",
        "bad-config": "train.epochs",
        "bad-cache": "cannot write MNIST's shard cache",
    }[case] in errors[0]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (taken / "metrics.jsonl").read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_one_bad_sample_does_not_stop_a_streamed_two_rank_run(tmp_path):
    """4 shards of 500 samples, one label garbled: the rank that skips it is a batch short of
    the 20 planned steps per epoch and refills it from its epoch's start (it used to stop the
    job: "rank 1 ran out of data after 19 of 20 planned steps")."""
    import io
    import tarfile

    import numpy as np

    from moe_vae.data.sources import from_arrays
    from moe_vae.data.writer import WriteOptions, write_shards

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2000, 8, 8), dtype=np.uint8)
    opts = WriteOptions(samples_per_shard=500, record="sample")
    write_shards(from_arrays(images, np.arange(2000) % 10, "s-"), tmp_path, "d", opts, False)
    shard = tmp_path / "d-000001.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    bad = next(i for i, (info, _) in enumerate(members) if info.name.endswith(".cls"))
    with tarfile.open(shard, "w") as tar:
        for i, (info, data) in enumerate(members):
            tar.addfile(info, io.BytesIO(b"X" * len(data) if i == bad else data))
    proc = deepspeed(
        2,
        str(BIN / "moe-vae"),
        *TRAIN_TINY,
        "--data.name=shards",
        f"--data.train_shards={tmp_path}/d-{{000000..000003}}.tar",
        "--data.test_shards=null",
        "--data.train_limit=null",
        "--data.loader=stream",
        "--data.num_workers=0",
        "--train.batch_size=100",
        "--train.max_steps=20",
        f"--output.dir={tmp_path}",
        "--output.name=r",
        "--track.wandb=disabled",
        "--quiet",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    epoch = next(r for r in records if r.get("event") == "epoch")
    assert epoch["step"] == 20 and epoch["data/refilled_steps"] == 1
    assert epoch["data/bad_samples"] == 1 and epoch["data/bad/bad_label"] == 1


def _step_losses(run: Path) -> dict[int, float]:
    return step_values(run / "metrics.jsonl")


def _kill_job_at_step(
    proc: subprocess.Popen, run: Path, step: int, sig: int = signal.SIGKILL
) -> tuple[str, str]:
    """Once the run has logged `step`, `sig` to the launcher and every rank (what a scheduler
    does: SLURM signals every process of the job; DeepSpeed's single-node runner would not pass
    a SIGTERM of its own on)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and max(
            step_values(run / "metrics.jsonl"), default=0
        ) >= step:
            os.killpg(proc.pid, sig)
            return proc.communicate(timeout=120)
        assert proc.poll() is None, "the job ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise TimeoutError(f"step {step} not reached")


def _epoch_records(run: Path) -> dict[int, dict]:
    """Each epoch's record in metrics.jsonl, the last one written winning (a resumed run
    appends)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["epoch"]: r for r in records if r.get("event") == "epoch"}


@pytest.mark.parametrize(
    ("zero", "sig"), [(0, signal.SIGKILL), (2, signal.SIGTERM)], ids=["zero0-kill-9", "zero2-term"]
)
def test_two_rank_stop_and_resume_matches_uninterrupted(tmp_path, zero, sig):
    """2 ranks through the deepspeed launcher, ZeRO 0 or 2: the whole job is SIGKILLed at a
    random step, or pre-empted (SIGTERM: every rank finishes its step, checkpoints and exits
    143 with the resume line), then resumed with train.resume=auto; per-step losses and final
    weights match the uninterrupted run (model, ZeRO's fp32 master weights, Adam state by
    parameter and every rank's RNG are restored). Stated tolerance for 2 processes: 1e-6."""
    common = [
        *TRAIN_TINY,
        f"--output.dir={tmp_path}",
        "--train.log_every=1",
        "--train.checkpoint_every=4",
        "--track.wandb=disabled",
        "--quiet",
        f"--parallel.deepspeed_config=configs/deepspeed/zero{zero}.json",
    ]
    full = deepspeed(2, str(BIN / "moe-vae"), *common, "--output.name=full")
    assert full.returncode == 0, full.stdout[-2000:] + full.stderr[-2000:]
    kill_at = random.Random(time.time_ns()).randint(5, 17)
    job = start_deepspeed(2, str(BIN / "moe-vae"), *common, "--output.name=part")
    out, err = _kill_job_at_step(job, tmp_path / "part", kill_at, sig)
    assert job.returncode != 0
    assert (tmp_path / "part" / "checkpoint.pt").is_file()
    if sig == signal.SIGTERM:
        stopped = load_checkpoint(tmp_path / "part" / "checkpoint.pt")["step"]
        assert stopped >= kill_at
        said = f"stopped by SIGTERM at step {stopped}; checkpoint saved: resume with"
        assert (out + err).count(said) == 1, (out + err)[-3000:]  # said once, by rank 0
    resumed = deepspeed(
        2, str(BIN / "moe-vae"), *common, "--output.name=part", "--train.resume=auto"
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    a, b = (
        step_values(tmp_path / "full/metrics.jsonl"),
        step_values(tmp_path / "part/metrics.jsonl"),
    )
    assert sorted(a) == sorted(b) == list(range(1, 21)), kill_at
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6), (step, kill_at)
    # The epoch records too (the checkpoint is mid-epoch): the part before it was rank 0's
    # statistics alone, on every rank, when the checkpoint held rank 0's sums.
    ea, eb = _epoch_records(tmp_path / "full"), _epoch_records(tmp_path / "part")
    assert sorted(ea) == sorted(eb) == [1, 2]
    for epoch, record in ea.items():
        for key in ("loss/total", "loss/balancing", "experts/importance"):
            assert eb[epoch][key] == pytest.approx(record[key], rel=1e-6), (epoch, key, kill_at)
    wa, wb = (
        load_file(tmp_path / "full" / "model.safetensors"),
        load_file(tmp_path / "part" / "model.safetensors"),
    )
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("zero", [0, 2])
def test_one_rank_nonfinite_step_is_skipped_on_every_rank(tmp_path, zero):
    """Rank 1 alone gets a NaN loss (step 3) and a NaN gradient (step 5): both steps are skipped
    on both ranks, with ZeRO 0 (where DeepSpeed itself would apply the NaN) and ZeRO 2."""
    port = _port()
    proc = deepspeed(
        2,
        str(HERE / "nonfinite_worker.py"),
        f"--zero-config={REPO}/configs/deepspeed/zero{zero}.json",
        f"--outdir={tmp_path}",
        port=port,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # DeepSpeed's CPU comm op leaves ~69 MB per rank in /dev/shm unless we unlink it.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] and report["skipped"] == 2 and report["manager_same"]


def test_an_error_of_rank_1_alone_is_not_lost(tmp_path):
    """Errors raised alike on every rank are said by rank 0 alone; one that only rank 1 met
    (rank 0 waiting for it) is said by rank 1 after a grace time, not lost when the launcher
    ends the job."""
    proc = deepspeed(
        2,
        str(HERE / "rank_error_worker.py"),
        *TRAIN_TINY,
        f"--output.dir={tmp_path}",
        "--track.wandb=disabled",
        timeout=300,
    )
    assert proc.returncode != 0
    errors = error_lines(proc.stderr)
    assert errors == ["moe-vae: error: rank 1: only rank 1 met this"], proc.stderr[-3000:]


def test_deepspeed_engine_in_one_process_without_a_launcher(tmp_path):
    """parallel.engine=deepspeed started plainly (what fp16's error suggests for one process):
    a job of one, where DeepSpeed would have looked for MPI and died on a missing mpi4py."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [
            str(BIN / "moe-vae"),
            *TRAIN_TINY,
            "--parallel.engine=deepspeed",
            "--train.max_steps=2",
            "--track.wandb=disabled",
            f"--output.dir={tmp_path}",
            "--output.name=one",
            "--quiet",
        ],
        cwd=REPO,
        env=dict(env, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = json.loads((tmp_path / "one" / "metrics.jsonl").open().readline())
    assert start["world_size"] == 1 and start["ep_size"] == 1
