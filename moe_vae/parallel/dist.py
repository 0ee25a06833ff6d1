"""Process setup for every launcher: deepspeed, torchrun and accelerate all set RANK/WORLD_SIZE/
LOCAL_RANK/MASTER_ADDR in the environment; DeepSpeed's init_distributed reads them.

On a machine without CUDA, DeepSpeed runs on its CPU accelerator with the gloo backend (unless
train.device says cuda: then that is an error, as for one process).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from moe_vae.errors import MoeVaeError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def launched_world_size() -> int:
    """Processes in this job, from the launcher's environment (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's global rank, from the launcher's environment (0 when run directly)."""
    return int(os.environ.get("RANK", "0"))


def check_cuda(device_name: str) -> None:
    """train.device=cuda where no CUDA device is: an error, not a silent CPU run (a job asked for
    GPUs would train for hours on CPUs). `auto` is the one that falls back."""
    if device_name == "cuda" and not torch.cuda.is_available():
        raise MoeVaeError(
            "train.device is 'cuda' but no CUDA device is available (train.device: auto falls "
            "back to the CPU)"
        )


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (once) and pick this rank's device."""
    check_cuda(device_name)  # before DeepSpeed starts (on its CPU accelerator, otherwise)
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if not use_cuda:
        # DeepSpeed picks its accelerator at import: tell it before the first import.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        _as_a_job_of_one()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if not use_cuda:
        dist.barrier()  # every rank has mapped every rank's workspace by now
        release_shm_workspace(dist.get_rank())
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


# What a collective raises when a peer process has exited (gloo's TCP transport).
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer")


def peer_lost(err: BaseException) -> bool:
    """A collective failed because another rank of the job exited (crashed, or stopped on its
    own error): this rank's traceback would bury that rank's message."""
    return any(text in str(err) for text in _PEER_LOST)


def said_by_this_rank(err: MoeVaeError, info: DistInfo) -> MoeVaeError:
    """Mark an error met by this rank alone during training: the command line prints it on this
    rank (not only rank 0's), named by rank in a job of several, and leaves without teardown."""
    tag = f"rank {info.rank}"
    if info.world_size > 1 and not str(err).startswith(tag):
        err.args = (f"{tag}: {err}",)
    err.is_main, err.world_size = True, info.world_size  # type: ignore[attr-defined]
    return err


def _as_a_job_of_one() -> None:
    """parallel.engine=deepspeed in one process started without a launcher: the environment a
    launcher would give a job of one, where DeepSpeed would look for MPI (mpi4py) instead."""
    import socket

    with socket.socket() as s:  # a free port for the process group's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**defaults, "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(key, value)


def release_shm_workspace(rank: int) -> None:
    """Unlink the ~69 MB shared-memory workspace DeepSpeed's CPU comm op creates per rank when
    all ranks share a node. DeepSpeed never unlinks it, so every CPU run would leave one file
    per rank in /dev/shm until the node fills up. The mappings stay valid; the memory is freed
    when the last rank exits, however it exits (kill -9 included)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
    Path("/dev/shm", name).unlink(missing_ok=True)


def exit_process(code: int) -> NoReturn:
    """Leave a finished multi-process run without the interpreter's teardown. Everything is
    written and the process group is destroyed by then, yet destructors of communication
    threads (gloo, DeepSpeed) occasionally abort the exit with SIGABRT ("terminate called
    without an active exception", seen once in ~30 clean CPU runs), which the launcher reports
    as a failed job. W&B's service process is stopped first (atexit would have done it)."""
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
