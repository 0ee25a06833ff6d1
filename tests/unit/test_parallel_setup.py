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


def _on_main_rank(rank: int, init_file: str, out: dict) -> None:
    import torch.distributed as dist

    from moe_vae.parallel.dist import DistInfo
    from moe_vae.parallel.setup import Parallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    par = Parallel(DistInfo(rank, 2, rank, torch.device("cpu")))

    def fails(err: Exception):
        def fn():
            raise err

        return fn

    got = []
    for fn in (lambda: 7, fails(MoeVaeError("bad run dir")), fails(OSError(28, "disk full"))):
        try:
            got.append(("value", par.on_main(fn)))
        except Exception as err:
            got.append((type(err).__name__, str(err)))
    out[rank] = got
    dist.destroy_process_group()


@pytest.mark.timeout(60)  # the failure this guards against is rank 1 waiting for ever
def test_an_error_of_rank_0_alone_is_raised_on_every_rank(tmp_path):
    """Parallel.on_main: its result on both ranks; a MoeVaeError on both; anything else as
    itself on rank 0 and named on rank 1, which would otherwise wait in the next collective
    (under NCCL until its timeout)."""
    import torch.multiprocessing as mp

    out = mp.Manager().dict()
    mp.spawn(_on_main_rank, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
    assert out[0] == [
        ("value", 7),
        ("MoeVaeError", "bad run dir"),
        ("OSError", "[Errno 28] disk full"),
    ]
    assert out[1] == [
        ("value", 7),
        ("MoeVaeError", "bad run dir"),
        ("MoeVaeError", "rank 0 failed (OSError: [Errno 28] disk full)"),
    ]
