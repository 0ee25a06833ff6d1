"""Training: the trainer (one process, or one rank of a launched job) and its run directory."""

from moe_vae.train.run_dir import RunDirError, prepare_run_dir
from moe_vae.train.trainer import RunResult, Trainer, train

__all__ = ["RunDirError", "RunResult", "Trainer", "prepare_run_dir", "train"]
