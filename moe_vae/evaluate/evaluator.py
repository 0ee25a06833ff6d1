"""One pass over a labelled split: clustering metrics, losses and the expert x class table.

Legend: N inputs, B batch, D flattened input, E experts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from moe_vae.config.schema import EvalConfig, LossConfig
from moe_vae.evaluate.metrics import clustering_metrics, contingency
from moe_vae.model.losses import expected_expert_loss, expert_losses, mixture_nll
from moe_vae.model.mixture import MixtureOfVAEs


@torch.no_grad()
def evaluate(
    model: MixtureOfVAEs,
    x_ND: torch.Tensor,
    labels_N: np.ndarray,
    loss_cfg: LossConfig,
    eval_cfg: EvalConfig,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics of `model` on (x, labels). The latent noise comes from its own seeded generator, so
    evaluating never moves the training RNG and two evaluations of one model agree."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=x_ND.device).manual_seed(seed)
    clusters, expected, mixture = [], 0.0, 0.0
    for start in range(0, len(x_ND), eval_cfg.batch_size):
        x_BD = x_ND[start : start + eval_cfg.batch_size]
        out = model(x_BD, generator=gen)
        loss_BE = expert_losses(x_BD, out, loss_cfg)
        expected += expected_expert_loss(out.probs_BE, loss_BE).item() * len(x_BD)
        mixture += mixture_nll(out.logits_BE, loss_BE).item() * len(x_BD)
        clusters.append(out.probs_BE.argmax(-1).cpu())
    model.train(was_training)
    assigned = torch.cat(clusters).numpy()
    n = max(len(x_ND), 1)
    result = clustering_metrics(labels_N, assigned, model.num_experts, eval_cfg.in_use_min_fraction)
    result.update(
        # The mean negative ELBO under the manager's weights (the seed's expected expert loss) and
        # under the mixture likelihood −log Σ p_i exp(−L_i), per input.
        neg_elbo=expected / n,
        neg_elbo_mixture=mixture / n,
        confusion=contingency(labels_N, assigned, model.num_experts).tolist(),
        num_samples=len(x_ND),
    )
    return result
