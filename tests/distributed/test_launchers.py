"""The launch/ scripts start the same entry point: torchrun across two simulated nodes on
127.0.0.1, accelerate launch with its config file, and the deepspeed single-node script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_deepspeed import _port

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
