"""How a process joins its job: the device it is asked for is the one it gets, or an error."""

from __future__ import annotations

import sys

import pytest
import torch

from moe_vae.config import load_config
from moe_vae.errors import MoeVaeError
from moe_vae.parallel.setup import setup_parallel


@pytest.mark.parametrize(
    ("engine", "world"),
    [("plain", "1"), ("deepspeed", "1"), ("auto", "2"), ("deepspeed", "4")],
)
def test_cuda_asked_where_there_is_none_is_refused_by_every_engine(monkeypatch, engine, world):
    """A rank in its launcher's environment, told train.device=cuda on a machine without CUDA:
    the same error as one process, before DeepSpeed starts (it would run on its CPU accelerator:
    hours of CPU training for a job that asked for GPUs)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # `import deepspeed` fails from here on: the refusal has to come before it.
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    launcher_env = {
        "WORLD_SIZE": world,
        "RANK": str(int(world) - 1),
        "LOCAL_RANK": str(int(world) - 1),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
        "DS_ACCELERATOR": "cuda",  # restored after the test, whatever the code under test sets
    }
    for key, value in launcher_env.items():
        monkeypatch.setenv(key, value)
    cfg = load_config(None, ["--train.device=cuda", f"--parallel.engine={engine}"])
    with pytest.raises(MoeVaeError, match=r"train\.device is 'cuda' but no CUDA device"):
        setup_parallel(cfg)
