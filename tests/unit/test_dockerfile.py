"""docker/Dockerfile, checked with the official Dockerfile parser (CI has no Docker engine)."""

import re
from pathlib import Path

import dockerfile

REPO = Path(__file__).resolve().parents[2]


def test_dockerfile_parses_and_has_what_a_cluster_image_needs():
    cmds = dockerfile.parse_file(str(REPO / "docker" / "Dockerfile"))
    names = [c.cmd.upper() for c in cmds]
    args = {c.value[0].split("=", 1)[0]: c.value[0] for c in cmds if c.cmd.upper() == "ARG"}
    assert "nvidia/cuda" in args["BASE"] and "devel" in args["BASE"]  # nvcc for DeepSpeed ops
    runs = " ".join(" ".join(c.value) for c in cmds if c.cmd.upper() == "RUN")
    for pkg in ("build-essential", "ninja-build", "python3-dev", "libaio-dev", "pdsh"):
        assert pkg in runs, pkg
    envs = [c.value for c in cmds if c.cmd.upper() == "ENV"]
    assert any("WANDB_MODE" in v and "offline" in v for v in envs)
    users = [c.value[0] for c in cmds if c.cmd.upper() == "USER"]
    assert users and users[-1] not in ("root", "0")
    # torch is installed before the project, so pip keeps the CUDA build.
    pip_runs = [
        " ".join(c.value)
        for c in cmds
        if c.cmd.upper() == "RUN" and "pip install" in " ".join(c.value)
    ]
    assert "${TORCH}" in pip_runs[0] and pip_runs[-1].endswith("pip install .")
    for c in cmds:
        if c.cmd.upper() == "COPY":
            for src in c.value[:-1]:
                if not src.startswith("--"):
                    assert (REPO / src).exists(), src
    assert names[-1] == "CMD"


def test_the_image_installs_a_torch_for_its_cuda():
    """The torch wheel index's CUDA version is the base image's (cu128 for 12.8.x): DeepSpeed
    builds its ops with the image's nvcc and checks it against the CUDA torch was built with."""
    cmds = dockerfile.parse_file(str(REPO / "docker" / "Dockerfile"))
    args = dict(c.value[0].split("=", 1) for c in cmds if c.cmd.upper() == "ARG")
    major, minor = re.search(r"nvidia/cuda:(\d+)\.(\d+)\.", args["BASE"]).groups()  # type: ignore[union-attr]
    index = re.search(r"download\.pytorch\.org/whl/cu(\d+)", args["TORCH"])
    assert index is not None and index[1] == f"{major}{minor}", (args["BASE"], args["TORCH"])
