"""Single-process training of the mixture (CPU or one GPU, chosen automatically).

Legend: N dataset size, B batch, D flattened input, E experts, Z latent.
Outputs in the run directory: config.yaml (resolved), metrics.jsonl, expert_grid.png (the seed's
figure), loss_curves.png, eval.json (final test metrics) and model.safetensors.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from moe_vae.config.load import config_to_yaml
from moe_vae.config.schema import Config
from moe_vae.data.mnist import Split, load_mnist
from moe_vae.errors import MoeVaeError
from moe_vae.evaluate.evaluator import evaluate
from moe_vae.evaluate.plots import save_expert_grid, save_loss_curves
from moe_vae.model.losses import mixture_objective
from moe_vae.model.mixture import MixtureOfVAEs
from moe_vae.track.jsonl import JsonlLogger
from moe_vae.train.run_dir import prepare_run_dir

STEP_KEYS = ("loss/total", "loss/expected", "loss/balancing", "loss/mixture")


@dataclass
class RunResult:
    run_dir: Path
    final_eval: dict[str, Any]
    epochs: list[dict[str, Any]]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MoeVaeError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_inputs(split: Split, device: torch.device) -> torch.Tensor:
    """uint8 [N, H, W] -> float [N, D] in [0, 1] on the device (MNIST fits in memory)."""
    x = torch.from_numpy(split.images.reshape(len(split.images), -1))
    return x.to(device=device, dtype=torch.float32) / 255.0


def _log_line(text: str) -> None:
    tqdm.write(text, file=sys.stdout)


def train(cfg: Config, run_name: str = "run", quiet: bool = False) -> RunResult:
    run_dir = prepare_run_dir(cfg.output, run_name)
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    device = pick_device(cfg.train.device)
    seed_everything(cfg.train.seed)

    train_split, test_split = load_mnist(cfg.data)
    image_shape = (1, *train_split.images.shape[1:])
    x_train, x_test = to_inputs(train_split, device), to_inputs(test_split, device)
    N, B = len(x_train), cfg.train.batch_size
    if B > N:
        raise MoeVaeError(f"train.batch_size {B} is larger than the training set ({N} samples)")
    steps_per_epoch = N // B if cfg.train.drop_last else math.ceil(N / B)

    model = MixtureOfVAEs(cfg.model, image_shape).to(device)
    optim = torch.optim.Adam(
        model.parameters(),
        lr=cfg.optim.lr,
        betas=(cfg.optim.betas[0], cfg.optim.betas[1]),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    # Separate generators: the data order and the figure's z do not depend on the model's draws.
    data_gen = torch.Generator().manual_seed(cfg.train.seed + 1)
    z_fixed_1Z = torch.randn(
        1, cfg.model.z_dim, generator=torch.Generator().manual_seed(cfg.train.seed + 2)
    ).to(device)

    grid_rows: list[np.ndarray] = []
    epochs: list[dict[str, Any]] = []
    final_eval: dict[str, Any] = {}
    step = 0
    with JsonlLogger(run_dir / "metrics.jsonl") as log:
        log.log(
            {
                "event": "start",
                "device": str(device),
                "num_params": _num_params(model),
                "train_samples": N,
                "test_samples": len(x_test),
                "steps_per_epoch": steps_per_epoch,
            }
        )
        for epoch in range(1, cfg.train.epochs + 1):
            t0 = time.perf_counter()
            sums = torch.zeros(len(STEP_KEYS), device=device)
            perm = torch.randperm(N, generator=data_gen).to(device)
            bar = tqdm(
                range(steps_per_epoch),
                desc=f"epoch {epoch}/{cfg.train.epochs}",
                disable=quiet or None,
                leave=False,
                file=sys.stdout,
            )
            n_steps = 0
            for i in bar:
                x_BD = x_train[perm[i * B : (i + 1) * B]]
                terms = mixture_objective(x_BD, model(x_BD), cfg.loss)
                optim.zero_grad(set_to_none=True)
                terms.total.backward()
                optim.step()
                step += 1
                n_steps += 1
                values = torch.stack(
                    [terms.total, terms.expected, terms.balancing, terms.mixture]
                ).detach()
                sums += values
                if step % cfg.train.log_every == 0:
                    vals = values.tolist()  # one host sync per logged step, not per step
                    log.log(
                        {"step": step, "epoch": epoch, **dict(zip(STEP_KEYS, vals, strict=True))}
                    )
                    bar.set_postfix(loss=f"{vals[0]:.2f}")
                if cfg.train.max_steps and step >= cfg.train.max_steps:
                    break
            seconds = time.perf_counter() - t0
            means = (sums / max(n_steps, 1)).tolist()
            record = {
                "event": "epoch",
                "epoch": epoch,
                "step": step,
                **dict(zip(STEP_KEYS, means, strict=True)),
                "epoch_seconds": seconds,
                "samples_per_second": n_steps * B / seconds,
            }
            model.eval()
            grid_rows.append(model.decode_all(z_fixed_1Z)[:, 0].cpu().numpy())
            model.train()
            last = epoch == cfg.train.epochs or bool(
                cfg.train.max_steps and step >= cfg.train.max_steps
            )
            every = cfg.eval.every_epochs
            if last or (every and epoch % every == 0):
                final_eval = evaluate(
                    model, x_test, test_split.labels, cfg.loss, cfg.eval, seed=cfg.train.seed
                )
                record.update({f"eval/{k}": v for k, v in final_eval.items() if k != "confusion"})
            log.log(record)
            epochs.append(record)
            if not quiet:
                _log_line(_epoch_summary(record))
            if last:
                break

        final_eval["epochs_run"] = len(epochs)
        final_eval["steps"] = step
        (run_dir / "eval.json").write_text(json.dumps(final_eval, indent=2))
        log.log({"event": "final", **{f"eval/{k}": v for k, v in final_eval.items()}})

    save_expert_grid(
        grid_rows, image_shape, run_dir / "expert_grid.png", [str(r["epoch"]) for r in epochs]
    )
    save_loss_curves(epochs, run_dir / "loss_curves.png")
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, run_dir / "model.safetensors", metadata={"config": config_to_yaml(cfg)})
    return RunResult(run_dir, final_eval, epochs)


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _epoch_summary(r: dict[str, Any]) -> str:
    text = (
        f"epoch {r['epoch']:>3} step {r['step']:>6}  total {r['loss/total']:.2f}  "
        f"expected {r['loss/expected']:.2f}  balancing {r['loss/balancing']:.3f}  "
        f"{r['samples_per_second']:.0f} samples/s  {r['epoch_seconds']:.1f}s"
    )
    if "eval/accuracy" in r:
        text += (
            f"  | test acc {r['eval/accuracy']:.3f} nmi {r['eval/nmi']:.3f} "
            f"ari {r['eval/ari']:.3f} in use {r['eval/experts_in_use']}"
        )
    return text
