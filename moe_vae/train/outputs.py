"""What a run shows and leaves behind: the pictures rewritten at each evaluation, the final
eval.json, loss curves and weights, and the console's line per epoch.

Legend: N images, D flattened input, E experts, Z latent.
The sampling functions are collectives under expert parallelism (every rank calls them); the
writers run on rank 0 only, the one with a tracker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from moe_vae.config.schema import Config
from moe_vae.evaluate.evaluator import to_inputs
from moe_vae.evaluate.plots import (
    save_confusion,
    save_expert_grid,
    save_expert_usage,
    save_hierarchy_grid,
    save_loss_curves,
    save_reconstructions,
)
from moe_vae.model.mixture import MixtureOfVAEs
from moe_vae.parallel.setup import Parallel
from moe_vae.track.base import MultiTracker
from moe_vae.train.checkpoint import last_prior, weights_metadata


@torch.no_grad()
def reconstructions(
    model: MixtureOfVAEs, par: Parallel, images: torch.Tensor, seed: int
) -> np.ndarray:
    """`images` and their reconstruction by the expert the manager picks: [2, N, D] in [0, 1]."""
    model.eval()
    x_ND = to_inputs(images.to(par.info.device))
    # Its own generator: figures must not move the training RNG (exact resume).
    gen = torch.Generator(device=par.info.device).manual_seed(seed)
    out = model(x_ND, generator=gen)
    logits_END = par.gather_experts(out.x_logits_EBD)
    model.train()
    pick = out.probs_BE.argmax(-1)
    recon_ND = logits_END[pick, torch.arange(len(pick), device=pick.device)].sigmoid()
    return torch.stack([x_ND, recon_ND]).cpu().numpy()


@torch.no_grad()
def leaf_samples(model: MixtureOfVAEs, par: Parallel, cfg: Config, n: int = 4) -> np.ndarray | None:
    """A hierarchical mixture's samples from every leaf, the same n latents for each:
    [top-level experts, leaves under each, n, D]; None when flat."""
    if not cfg.model.hierarchy:
        return None
    gen = torch.Generator().manual_seed(cfg.train.seed + 3)  # not the training RNG
    z_NZ = torch.randn(n, cfg.model.z_dim, generator=gen).to(par.info.device)
    images_END = par.gather_experts(model.decode_all(z_NZ))
    shape = (cfg.model.num_clusters, -1, n, images_END.shape[-1])
    return images_END.reshape(shape).cpu().numpy()


@dataclass
class RunFiles:
    """Rank 0's writer of the run directory's pictures and final files, each also sent to the
    tracker. `grid_rows` and `epochs`: the run's so far (a grid row and a record per epoch)."""

    tracker: MultiTracker
    run_dir: Path
    cfg: Config
    image_shape: tuple[int, int, int]

    def grid(self, grid_rows: list[np.ndarray], epochs: list[dict[str, Any]]) -> Path:
        """The seed's figure: one shared z decoded by every expert, a row per epoch."""
        path = self.run_dir / "expert_grid.png"
        save_expert_grid(grid_rows, self.image_shape, path, [str(r["epoch"]) for r in epochs])
        return path

    def figures(
        self,
        grid_rows: list[np.ndarray],
        epochs: list[dict[str, Any]],
        ev: dict[str, Any],
        recon: np.ndarray | None,
        leaves: np.ndarray | None,
        step: int,
    ) -> None:
        """An evaluation's PNG files. `epochs[-1]`: the record of the epoch just evaluated."""
        images = {"samples/expert_grid": self.grid(grid_rows, epochs)}
        images["experts/usage"] = self.run_dir / "expert_usage.png"
        save_expert_usage(epochs[-1]["experts/importance"], images["experts/usage"])
        if "confusion" in ev:
            images["eval/confusion"] = self.run_dir / "confusion.png"
            save_confusion(ev["confusion"], images["eval/confusion"])
        if recon is not None:
            images["eval/reconstructions"] = self.run_dir / "reconstructions.png"
            save_reconstructions(recon, self.image_shape, images["eval/reconstructions"])
        if leaves is not None:
            images["samples/hierarchy"] = self.run_dir / "hierarchy_samples.png"
            save_hierarchy_grid(leaves, self.image_shape, images["samples/hierarchy"])
        self.tracker.log_images(images, step)

    def final(
        self,
        grid_rows: list[np.ndarray],
        epochs: list[dict[str, Any]],
        final_eval: dict[str, Any],
        weights: dict[str, torch.Tensor],
        step: int,
    ) -> None:
        """eval.json, the final record and summary, the grid and loss curves, and the weights
        (with the resolved config, image shape and the last epoch's mixing weights in their
        metadata); the tracker is finished."""
        (self.run_dir / "eval.json").write_text(json.dumps(final_eval, indent=2))
        final = {f"eval/{k}": v for k, v in final_eval.items()}
        self.tracker.log({"event": "final", **final}, step)
        self.tracker.summary(final)
        self.grid(grid_rows, epochs)
        save_loss_curves(epochs, self.run_dir / "loss_curves.png")
        self.tracker.finish()
        metadata = weights_metadata(self.cfg, self.image_shape, last_prior(epochs))
        save_file(weights, self.run_dir / "model.safetensors", metadata=metadata)


def epoch_summary(r: dict[str, Any]) -> str:
    """The console's line for an epoch record (with the evaluation's figures if it has them)."""
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
