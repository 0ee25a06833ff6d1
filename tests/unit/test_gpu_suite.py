"""benchmarks/gpu_suite.sh is run only where a GPU is lent, often with little time. Checked
here so that such a session does not spend it on a typo: every part's commands resolve to a
valid config (through `--print-config`), failures are recorded without stopping the rest, and
an unknown part is refused before anything runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUITE = REPO / "benchmarks" / "gpu_suite.sh"
PARTS = ["recipe", "profile", "train_eager", "train", "batch", "topk", "topk_levers", "scaling"]


def _suite(tmp_path: Path, stub_body: str, *parts: str) -> subprocess.CompletedProcess:
    """Runs the suite with `moe-vae` on PATH replaced by a shell script with `stub_body`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "moe-vae"
    stub.write_text(f"#!/bin/sh\n{stub_body}\n")
    stub.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,  # the suite's own Python steps (bf16_adam needs torch)
    }
    return subprocess.run(
        ["bash", str(SUITE), str(tmp_path / "out"), *parts],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _summary(tmp_path: Path) -> dict[str, int]:
    lines = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    return {m[1]: int(m[2]) for m in (re.match(r"(\S+) rc=(\d+) \d+s$", ln) for ln in lines)}


def test_every_step_resolves_its_config(tmp_path):
    real = Path(sys.prefix) / "bin" / "moe-vae"
    proc = _suite(tmp_path, f'exec "{real}" "$@" --print-config', *PARTS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = _summary(tmp_path)
    assert len(summary) == 29
    # Every step resolved its config; the comparison found no finished runs and said so.
    assert summary.pop("compare") == 2
    assert summary == dict.fromkeys(summary, 0), proc.stdout[-3000:]
    out = tmp_path / "out"
    fast = (out / "recipe_fast.txt").read_text()
    assert "compile: reduce-overhead" in fast and "fused_input: true" in fast
    grouped = (out / "topk_1023_grouped.txt").read_text()  # CUDA's grouped GEMM: < 1024 groups
    assert "num_experts: 1023" in grouped and "expert_gemm: grouped" in grouped
    assert "batch_size: 4096" in grouped and "routing: topk" in grouped
    assert "precision: bf16" in (out / "batch4096_graph_bf16.txt").read_text()
    assert "precision: bf16-true" in (out / "topk_1024_bf16true.txt").read_text()
    assert "bf16_rounding: nearest" in (out / "topk_1024_bf16true_nearest.txt").read_text()
    assert "stochastic bf16, compiled" in (out / "bf16_adam.txt").read_text()
    assert "batch_size: 16384" in (out / "topk_1024_batch16k.txt").read_text()
    assert "cuda_graph: true" in (out / "train_graph.txt").read_text()
    assert "batch_size: 1024" in (out / "scaling_top1_b1024.txt").read_text()


def test_a_failing_step_is_recorded_and_the_rest_still_run(tmp_path):
    proc = _suite(tmp_path, "echo broken >&2; exit 3", "recipe", "profile")
    assert proc.returncode == 0
    assert _summary(tmp_path) == dict.fromkeys(
        [
            "recipe_eager",
            "recipe_fast",
            "recipe_graph",
            "recipe_graph_eager",
            "recipe_graph_bf16",
            "profile_eager",
            "profile_fast",
        ],
        3,
    )
    assert "broken" in (tmp_path / "out" / "recipe_fast.txt").read_text()


def test_an_unknown_part_is_refused_before_anything_runs(tmp_path):
    proc = _suite(tmp_path, "exit 0", "recipe", "benchmark")
    assert proc.returncode == 2
    assert "unknown part 'benchmark'" in proc.stderr
    assert not (tmp_path / "out" / "summary.txt").exists()
