"""The launch/ scripts start the same entry point: torchrun across two simulated nodes on
127.0.0.1, accelerate launch with its config file, and the deepspeed single-node script; the
SLURM script (no SLURM here) with stand-ins for srun and scontrol, and for deepspeed too where
only its arguments are looked at."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_deepspeed import _port

from moe_vae.config import load_config

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.prefix) / "bin"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **extra)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return env


def _start(tmp_path: Path) -> dict:
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[0])


ARGS = [
    "configs/tiny.yaml",
    "--output.name=r",
    "--train.max_steps=6",
    "--train.checkpoint_every=3",
    "--quiet",
]


def test_torchrun_two_nodes(tmp_path):
    port = str(_port())
    procs = [
        subprocess.Popen(
            ["bash", "launch/torchrun.sh", "1", *ARGS, f"--output.dir={tmp_path}"],
            cwd=REPO,
            env=_env(
                NNODES="2",
                NODE_RANK=str(node),
                RDZV_HOST="127.0.0.1",
                RDZV_PORT=port,
                RDZV_ID=f"test-{port}",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    try:
        outs = [p.communicate(timeout=420)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    start = _start(tmp_path)
    assert start["world_size"] == 2 and start["ep_size"] == 2
    assert (tmp_path / "r" / "checkpoint.pt").is_file()
    assert json.loads((tmp_path / "r" / "eval.json").read_text())["steps"] == 6


def test_accelerate_launch(tmp_path):
    proc = subprocess.run(
        [
            "bash",
            "launch/accelerate.sh",
            *ARGS,
            f"--output.dir={tmp_path}",
        ],
        cwd=REPO,
        env=_env(MASTER_PORT=str(_port())),
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    start = _start(tmp_path)
    assert start["world_size"] == 2


def test_deepspeed_single_node_script(tmp_path):
    proc = subprocess.run(
        [
            "bash",
            "launch/deepspeed_single_node.sh",
            "2",
            *ARGS,
            f"--output.dir={tmp_path}",
            "--parallel.deepspeed_config=configs/deepspeed/zero1.json",
        ],
        cwd=REPO,
        env=_env(MASTER_PORT=str(_port())),
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert _start(tmp_path)["world_size"] == 2


def test_scripts_reject_missing_arguments():
    for script in (
        "torchrun.sh",
        "accelerate.sh",
        "deepspeed_single_node.sh",
        "deepspeed_multi_node.sh",
        "train_single.sh",
    ):
        proc = subprocess.run(
            ["bash", f"launch/{script}"], cwd=REPO, capture_output=True, text=True, timeout=30
        )
        assert proc.returncode == 2 and "usage:" in proc.stderr, script


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)


def test_slurm_script_passes_overrides_as_typed(tmp_path):
    """launch/slurm_deepspeed.sbatch run by bash, with srun (runs its command as node 0),
    scontrol and deepspeed (records its arguments and its ignored signals) stood in for: the
    config path and overrides with spaces, brackets and braces arrive one argument each, as
    typed, the job's hostfile (one line per node, its GPU count as slots) is passed, and the
    per-node launcher ignores SIGTERM (Slurm's warning is for the ranks)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "srun", 'while [[ $1 == --* ]]; do shift; done\nSLURM_NODEID=0 exec "$@"')
    _stub(bin_dir, "scontrol", "printf 'node-001\\nnode-002\\n'")
    _stub(bin_dir, "moe-vae", "exit 1")
    _stub(
        bin_dir,
        "deepspeed",
        f'printf "%s\\n" "$@" > "{tmp_path}/argv"\n'
        f'sed -n "s/^SigIgn:[[:space:]]*//p" /proc/$$/status > "{tmp_path}/ignored"',
    )
    overrides = [
        "--data.train_shards=data/train-{000000..000005}.tar",
        "--model.encoder_layers=[256, 128]",
        "--output.name=a *",
    ]
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_NODELIST="node-[001-002]",
        SLURM_NNODES="2",
        SLURM_GPUS_PER_NODE="h100:4",
        MOE_VAE_LAUNCH_DIR=str(tmp_path / "launch"),
    )
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(
        ["bash", "launch/slurm_deepspeed.sbatch", "configs/my run.yaml", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    hostfile = Path(argv[1])
    assert hostfile.is_absolute() and hostfile.is_relative_to(tmp_path / "launch")
    assert hostfile.read_text() == "node-001 slots=4\nnode-002 slots=4\n"
    assert argv == [
        "--hostfile",
        str(hostfile),
        "--no_ssh",
        "--node_rank",
        "0",
        "--num_nodes",
        "2",
        "--num_gpus",
        "4",
        "--master_addr",
        "node-001",
        "--master_port",
        "29500",
        str(bin_dir / "moe-vae"),
        "train",
        "--config",
        "configs/my run.yaml",
        *overrides,
    ]
    ignored = int((tmp_path / "ignored").read_text(), 16)
    assert ignored & (1 << (signal.SIGTERM - 1)), "SIGTERM would end the per-node launcher"


@pytest.mark.parametrize(
    "gpu_env, slots",
    [({"SLURM_GPUS_ON_NODE": "2"}, 2), ({"SLURM_GPUS_PER_NODE": "gpu:h100:8"}, 8), ({}, None)],
)
def test_slurm_script_counts_gpus_per_node(tmp_path, gpu_env, slots):
    """The hostfile's slots come from --gpus-per-node (SLURM_GPUS_PER_NODE, perhaps typed) or,
    in a --gres=gpu:N job, SLURM_GPUS_ON_NODE; with neither the script stops with one line
    before anything is launched, where it used to assume 8 GPUs a node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "srun", 'while [[ $1 == --* ]]; do shift; done\nSLURM_NODEID=0 exec "$@"')
    _stub(bin_dir, "scontrol", "printf 'node-001\\nnode-002\\n'")
    _stub(bin_dir, "moe-vae", "exit 1")
    _stub(bin_dir, "deepspeed", f'printf "%s\\n" "$@" > "{tmp_path}/argv"')
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_GPUS")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_NODELIST="node-[001-002]",
        SLURM_NNODES="2",
        MOE_VAE_LAUNCH_DIR=str(tmp_path / "launch"),
        **gpu_env,
    )
    proc = subprocess.run(
        ["bash", "launch/slurm_deepspeed.sbatch", "configs/tiny.yaml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if slots is None:
        assert proc.returncode == 2 and not (tmp_path / "argv").exists()
        assert "--gpus-per-node=N or --gres=gpu:N" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    assert Path(argv[1]).read_text() == f"node-001 slots={slots}\nnode-002 slots={slots}\n"
    assert argv[argv.index("--num_gpus") + 1] == str(slots)


def test_slurm_script_trains_on_two_nodes(tmp_path):
    """launch/slurm_deepspeed.sbatch with the real deepspeed runner on two simulated nodes:
    srun stands in by starting one task per node on this machine (node-001, the master, is
    127.0.0.1 here), scontrol by listing the two hosts. Each node's runner finds both in the
    hostfile (without one it refused --num_nodes 2) and the job trains as one world of 2."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(
        bin_dir,
        "srun",
        "while [[ $1 == --* ]]; do shift; done\n"
        'for node in 0 1; do MASTER_ADDR=127.0.0.1 SLURM_NODEID=$node "$@" & done\n'
        # --kill-on-bad-exit: a node that fails ends the other (KILL: the tasks ignore TERM)
        "for node in 0 1; do wait -n || { rc=$?; kill -KILL $(jobs -p); exit $rc; }; done",
    )
    _stub(bin_dir, "scontrol", "printf 'node-001\\nnode-002\\n'")
    env = _env(
        SLURM_JOB_NODELIST="node-[001-002]",
        SLURM_NNODES="2",
        SLURM_GPUS_PER_NODE="1",
        MASTER_PORT=str(_port()),
        MOE_VAE_LAUNCH_DIR=str(tmp_path / "launch"),
    )
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    proc = subprocess.Popen(
        ["bash", "launch/slurm_deepspeed.sbatch", *ARGS, f"--output.dir={tmp_path}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the nodes run in the background: end them all on a timeout
    )
    try:
        out = proc.communicate(timeout=420)[0]
    finally:
        if proc.poll() is None or proc.returncode != 0:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    start = _start(tmp_path)
    assert start["world_size"] == 2 and start["ep_size"] == 2
    assert (tmp_path / "r" / "checkpoint.pt").is_file()
    assert json.loads((tmp_path / "r" / "eval.json").read_text())["steps"] == 6


def test_multi_node_script_resolves_overrides_once_for_every_node(tmp_path):
    """launch/deepspeed_multi_node.sh with deepspeed stood in for (it records its arguments):
    the overrides, a brace pattern among them, are resolved by the real moe-vae into one config
    file (pdsh's remote shell would brace-expand them), launched with no override after it;
    a bad override fails before anything is launched."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "deepspeed", f'printf "%s\\n" "$@" > "{tmp_path}/argv"')
    (bin_dir / "moe-vae").symlink_to(Path(sys.prefix) / "bin" / "moe-vae")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=4\nnode-b slots=4\n")
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        MOE_VAE_LAUNCH_DIR=str(tmp_path / "launch"),
    )
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    shards = "--data.train_shards=data/train-{000000..000005}.tar"
    script = ["bash", "launch/deepspeed_multi_node.sh", str(hostfile), "configs/tiny.yaml"]
    run = dict(cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    proc = subprocess.run([*script, "--data.name=shards", shards, "--model.z_dim=3"], **run)
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[:6] == [
        "--hostfile",
        str(hostfile),
        "--master_addr",
        "node-a",
        "--master_port",
        "29500",
    ]
    assert argv[7:9] == ["train", "--config"] and len(argv) == 10  # no override after it
    resolved = Path(argv[9])
    assert resolved.name == "tiny.yaml" and resolved.is_relative_to(tmp_path / "launch")
    cfg = load_config(resolved)
    assert cfg.data.train_shards == "data/train-{000000..000005}.tar" and cfg.model.z_dim == 3
    (tmp_path / "argv").unlink()
    proc = subprocess.run([*script, "--model.z_dim=none"], **run)
    assert proc.returncode != 0 and "model.z_dim" in proc.stderr
    assert not (tmp_path / "argv").exists()
