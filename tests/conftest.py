"""Shared test fixtures: repository paths and the tiny config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from moe_vae.config import load_config
from moe_vae.track.jsonl import step_values

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


@pytest.fixture(scope="session", autouse=True)
def _shard_cache(tmp_path_factory: pytest.TempPathFactory):
    """One MNIST shard cache for the whole session (and its subprocesses), not the user's.

    Only moe-vae's own cache moves: XDG_CACHE_HOME stays, so DeepSpeed's compiled CPU comm op
    (in torch's extension cache) is built once per machine, not once per test session.
    """
    old = os.environ.get("MOE_VAE_CACHE")
    os.environ["MOE_VAE_CACHE"] = str(tmp_path_factory.mktemp("cache") / "moe_vae")
    yield
    if old is None:
        os.environ.pop("MOE_VAE_CACHE", None)
    else:
        os.environ["MOE_VAE_CACHE"] = old


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def tiny_config() -> Path:
    return CONFIGS / "tiny.yaml"


@pytest.fixture
def train_steps(tmp_path, monkeypatch):
    """Trains the tiny config for a few logged steps: train_steps(name, *overrides, steps=4,
    fixed_noise=False) returns (the loss of each step, the final weights). fixed_noise: every
    (expert, input position) pair draws the same latent noise whatever the routing's layout."""
    from moe_vae.train.trainer import Trainer

    monkeypatch.chdir(REPO)

    def run(
        name: str, *extra: str, steps: int = 4, fixed_noise: bool = False
    ) -> tuple[list[float], dict[str, torch.Tensor]]:
        cfg = load_config(
            CONFIGS / "tiny.yaml",
            [
                f"--output.dir={tmp_path}",
                f"--output.name={name}",
                f"--train.max_steps={steps}",
                "--train.log_every=1",
                "--track.wandb=disabled",
                *extra,
            ],
        )
        trainer = Trainer(cfg, quiet=True)
        if fixed_noise:
            m, seeded = cfg.model, torch.Generator().manual_seed(7)
            inputs = max(cfg.train.batch_size, cfg.eval.batch_size)  # the final eval draws too
            eps = torch.randn(m.num_experts, inputs, m.z_dim, generator=seeded)
            eps = eps.to(trainer.device)
            trainer.model.noise = lambda e, n, z: eps[e, n]
        result = trainer.fit()
        values = step_values(result.run_dir / "metrics.jsonl")
        weights = {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()}
        return [values[step] for step in sorted(values)], weights

    return run


def _weights_agree(
    got: dict[str, torch.Tensor],
    want: dict[str, torch.Tensor],
    adam_steps: int,
    lr: float = 1e-3,
    tight: float = 1e-4,
    share: float = 5e-3,
) -> None:
    """Two runs of the same training trained alike, up to rounding. Adam moves a weight by ~lr
    whatever its gradient's size, so a rounding difference can flip the update of a weight
    whose gradient is near 0 (the manager's under top-k: the routed loss minus the batch's
    mean, a difference of two ~500s): every weight within adam_steps · lr, and all but `share`
    of each tensor's entries within `tight` (share=0: all). A real difference moves most."""
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=0, atol=adam_steps * lr + 1e-5, msg=name)
        off = ((got[name] - w).abs() > tight).float().mean().item()
        assert off <= share, f"{name}: {off:.2%} of its entries differ by more than {tight}"


@pytest.fixture
def weights_agree():
    """_weights_agree(got, want, adam_steps, lr=1e-3, tight=1e-4, share=5e-3)."""
    return _weights_agree
