"""One pass over an evaluation split: clustering metrics, losses and the expert x class table.

Legend: N inputs, B batch, C/H/W image, D flattened input, E experts (top-level: clusters).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from moe_vae.config.schema import EvalConfig, LossConfig
from moe_vae.evaluate.metrics import cluster_usage, clustering_metrics, contingency
from moe_vae.model.losses import expected_expert_loss, mixture_nll, routed_logits
from moe_vae.model.mixture import MixtureOfVAEs, Routed


def to_inputs(images_BCHW: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float [B, D] in [0, 1], the model's input."""
    return images_BCHW.flatten(1).float().div_(255.0)


def evaluation_losses(
    model: MixtureOfVAEs,
    x_BD: torch.Tensor,
    loss_cfg: LossConfig,
    generator: torch.Generator | None = None,
) -> tuple[Routed, torch.Tensor]:
    """The forward that evaluation and scores share: top-k routed dropless, and the manager's
    logits renormalised over the routed experts (−inf elsewhere; dense: unchanged). The model
    should be in eval mode, so that top-k routes greedily."""
    routed = model.losses(x_BD, loss_cfg, generator=generator, capacity_factor=0.0)
    return routed, routed_logits(routed.logits_BE, routed.mask_BE)


@torch.no_grad()
def evaluate(
    model: MixtureOfVAEs,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_cfg: LossConfig,
    eval_cfg: EvalConfig,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics of `model` on (uint8 images, labels) batches; labels -1 = unknown.

    The latent noise comes from its own seeded generator, so evaluating never moves the training
    RNG and two evaluations of one model agree. Without labels, only losses and cluster sizes.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    clusters, labels, expected, mixture, n = [], [], 0.0, 0.0, 0
    for images, labels_B in batches:
        x_BD = to_inputs(images.to(device))
        routed, logits_BE = evaluation_losses(model, x_BD, loss_cfg, gen)
        expected += expected_expert_loss(logits_BE.softmax(-1), routed.loss_BE).item() * len(x_BD)
        mixture += mixture_nll(logits_BE, routed.loss_BE).item() * len(x_BD)
        n += len(x_BD)
        clusters.append(model.cluster_logits(routed.logits_BE).argmax(-1).cpu())
        labels.append(labels_B.cpu())
    model.train(was_training)
    assigned = torch.cat(clusters).numpy()
    truth = torch.cat(labels).numpy()
    E = model.num_clusters
    result: dict[str, Any]
    if len(truth) and (truth >= 0).all():
        result = clustering_metrics(truth, assigned, E, eval_cfg.in_use_min_fraction)
        result["confusion"] = contingency(truth, assigned, E).tolist()
    else:
        result = cluster_usage(assigned, E, eval_cfg.in_use_min_fraction)
    # The mean negative ELBO under the manager's weights (the seed's expected expert loss) and
    # under the mixture likelihood −log Σ p_i exp(−L_i), per input.
    result.update(
        neg_elbo=expected / max(n, 1), neg_elbo_mixture=mixture / max(n, 1), num_samples=n
    )
    return result
