"""Loss terms of the mixture (docs: model.md).

Legend: B batch, D flattened input, E experts, Z latent.
Per expert i and input x: L_i(x) = −log p(x | z_i) + KL(q_i(z | x) || N(0, I)), one sample of z.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from moe_vae.config.schema import LossConfig
from moe_vae.model.experts import ExpertOutput

if TYPE_CHECKING:
    from moe_vae.model.mixture import Routed


def gaussian_nll(x_BD: torch.Tensor, x_logits_EBD: torch.Tensor, std: float) -> torch.Tensor:
    """−log N(x; sigmoid(logits), std² I), summed over pixels: [E, B]."""
    mean_EBD = torch.sigmoid(x_logits_EBD)
    # mse_loss: the squared difference is one kernel forward and one backward, where
    # (x - mean).square() is two and three (sub, pow; pow's backward, neg). Scaled after the
    # sum: one elementwise pass fewer over [E, B, D].
    sq_EB = F.mse_loss(mean_EBD, x_BD.expand_as(mean_EBD), reduction="none").sum(-1)
    d = x_BD.shape[-1]
    return (0.5 / std**2) * sq_EB + d * (math.log(std) + 0.5 * math.log(2 * math.pi))


def bernoulli_nll(x_BD: torch.Tensor, x_logits_EBD: torch.Tensor) -> torch.Tensor:
    """−log Bernoulli(x; sigmoid(logits)), summed over pixels: [E, B] (x may be grey, in [0, 1])."""
    target = x_BD.expand_as(x_logits_EBD)
    return F.binary_cross_entropy_with_logits(x_logits_EBD, target, reduction="none").sum(-1)


def kl_standard_normal(mu_EBZ: torch.Tensor, var_EBZ: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, var) || N(0, I)), summed over latent dims: [E, B]."""
    return 0.5 * (var_EBZ + mu_EBZ.pow(2) - 1.0 - var_EBZ.log()).sum(-1)


def elbo_losses(x_BD: torch.Tensor, out: ExpertOutput, cfg: LossConfig) -> torch.Tensor:
    """L_i(x) = −log p(x | z_i) + KL for each expert of the bank and each input: [E, B].
    In fp32 whatever the experts ran in (bf16 autocast): sums over 784 pixels need it."""
    x_logits_EBD = out.x_logits_EBD.float()
    if cfg.likelihood == "gaussian":
        nll_EB = gaussian_nll(x_BD, x_logits_EBD, cfg.decoder_std)
    else:
        nll_EB = bernoulli_nll(x_BD, x_logits_EBD)
    return nll_EB + kl_standard_normal(out.mu_EBZ.float(), out.var_EBZ.float())


def expected_expert_loss(probs_BE: torch.Tensor, loss_BE: torch.Tensor) -> torch.Tensor:
    """mean over the batch of Σ_i p_i(x) L_i(x)."""
    return (probs_BE * loss_BE).sum(-1).mean()


def mixture_nll_per_input(logits_BE: torch.Tensor, loss_BE: torch.Tensor) -> torch.Tensor:
    """−log Σ_i p_i(x) exp(−L_i(x)) of each input, computed stably in log space: [B]."""
    return -torch.logsumexp(logits_BE.log_softmax(-1) - loss_BE, dim=-1)


def mixture_nll(logits_BE: torch.Tensor, loss_BE: torch.Tensor) -> torch.Tensor:
    """The mixture negative log-likelihood, mean over the batch."""
    return mixture_nll_per_input(logits_BE, loss_BE).mean()


def fill_unrouted(
    loss_BE: torch.Tensor,
    mask_BE: torch.Tensor,
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Top-k training: every (input, expert) pair that was not computed (not chosen, or dropped
    over capacity) counts at the global batch's mean computed loss, a constant without gradient.

    Why: counted at 0, an uncomputed pair is a perfect fit. The expected loss then only ever
    lowers the chosen experts' probability (towards experts never evaluated), and overflow
    lowers the loss: top-1 over 1024 experts dropped 99.8 % of its pairs. With the batch mean
    as the estimate the manager's gradient on a chosen expert is p(1 − p)(L − mean): raised where
    its loss is below the batch's average computed pair, lowered where above (a baseline, as
    in REINFORCE), and a dropped pair is neutral. The mean is over all inputs, so it also
    reflects how hard the input is: a hard input lowers its chosen expert whichever it is.
    A per-expert running mean would not change that (the hard input is above every expert's
    mean too): telling difficulty from fit needs another expert's loss on the same input,
    which top-k with k >= 2 computes."""
    computed = loss_BE.detach().masked_fill(~mask_BE, 0.0)  # what lies elsewhere never counts
    stats = torch.stack([computed.sum(), mask_BE.sum(dtype=loss_BE.dtype)])
    if sum_over_ranks is not None:  # the global batch's mean, as on one device
        stats = sum_over_ranks(stats)
    return torch.where(mask_BE, loss_BE, stats[0] / stats[1].clamp_min(1.0))


def routed_logits(logits_BE: torch.Tensor, mask_BE: torch.Tensor | None) -> torch.Tensor:
    """Evaluation of top-k: the manager's logits over the computed pairs only (−inf elsewhere),
    so its probabilities renormalise over the experts the input was routed to, the mixture
    top-k routing defines. Every input needs one computed pair: route dropless."""
    return logits_BE if mask_BE is None else logits_BE.masked_fill(~mask_BE, float("-inf"))


def variance_balancing(
    probs_BE: torch.Tensor,
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
    levels: list[int] | None = None,
) -> torch.Tensor:
    """Population variance across experts of importance_i = Σ_batch p_i(x).

    With data parallelism the batch is split over ranks: `sum_over_ranks` (a differentiable
    all-reduce) makes the importance that of the global batch, as on one device.
    A hierarchy balances per level: the variance among siblings (children of one node) of
    their importance, averaged over the nodes, summed over the levels; one level is the above.
    """
    importance_P = probs_BE.sum(0)
    if sum_over_ranks is not None:
        importance_P = sum_over_ranks(importance_P)
    total = importance_P.new_zeros(())
    for n in reversed(levels or [len(importance_P)]):
        siblings_PN = importance_P.reshape(-1, n)
        total = total + siblings_PN.var(dim=1, unbiased=False).mean()
        importance_P = siblings_PN.sum(1)  # the parents' importance
    return total


@dataclass
class LossTerms:
    total: torch.Tensor  # what is minimised
    expected: torch.Tensor  # expected expert loss (always reported)
    mixture: torch.Tensor  # mixture negative log-likelihood (always reported)
    balancing: torch.Tensor  # unweighted balancing term
    usage_2E: torch.Tensor  # [summed probabilities, argmax counts] (no grad; manager_usage)
    entropy: torch.Tensor  # mean manager entropy (no grad)
    dropped: torch.Tensor | None = None  # top-k: (input, expert) pairs over capacity
    applied: torch.Tensor | None = None  # train.host_sync=log: 1 if the update was applied


def argmax_choices(probs_BE: torch.Tensor) -> torch.Tensor:
    """Each input's most probable expert as a [B, E] bool mask, by comparison with every expert
    id, not bincount or one_hot: on a GPU both read the ids' range back to the host."""
    ids_E = torch.arange(probs_BE.shape[1], device=probs_BE.device)
    return probs_BE.detach().argmax(-1, keepdim=True) == ids_E


def choice_balancing(
    probs_BE: torch.Tensor,
    chosen_BE: torch.Tensor | None = None,
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The Switch Transformer's load-balancing term, E · Σ_i f_i · P_i: f_i the share of the
    manager's choices that go to expert i (top-k's chosen pairs, dropped ones included; the
    argmax under dense routing), no gradient; P_i expert i's share of the probability mass.
    1 when both are uniform. Its gradient lowers the probability of the experts chosen most:
    what the variance of importance misses when the probabilities are flat but the choices are
    not (top-1 over many experts then sends nearly everything to one expert and drops it)."""
    E = probs_BE.shape[1]
    if chosen_BE is None:
        chosen_BE = argmax_choices(probs_BE)
    counts_E = chosen_BE.sum(0, dtype=probs_BE.dtype)
    importance_E = probs_BE.sum(0)
    if sum_over_ranks is not None:  # the global batch's shares, as on one device
        counts_E, importance_E = sum_over_ranks(counts_E), sum_over_ranks(importance_E)
    f_E = (counts_E / counts_E.sum()).detach()
    return E * (f_E * importance_E / importance_E.sum()).sum()


def manager_usage(probs_BE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The manager's usage statistics, without gradient: ([summed probabilities, argmax counts]
    per expert [2, E], mean entropy)."""
    probs_BE = probs_BE.detach()
    counts_E = argmax_choices(probs_BE).sum(0, dtype=probs_BE.dtype)
    entropy = -(probs_BE * probs_BE.clamp_min(1e-12).log()).sum(-1).mean()
    return torch.stack([probs_BE.sum(0), counts_E]), entropy


def objective(
    routed: Routed,
    cfg: LossConfig,
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> LossTerms:
    """Total = (expected expert loss or mixture NLL) + balancing_weight * balancing
    (+ choice_balancing_weight * the Switch-style term on the manager's choices)."""
    logits_BE, loss_BE = routed.logits_BE, routed.loss_BE
    if routed.mask_BE is not None:  # top-k: the uncomputed pairs at the batch's mean loss
        loss_BE = fill_unrouted(loss_BE, routed.mask_BE, sum_over_ranks)
    probs_BE = logits_BE.softmax(-1)
    expected = expected_expert_loss(probs_BE, loss_BE)
    mixture = mixture_nll(logits_BE, loss_BE)
    balancing = variance_balancing(probs_BE, sum_over_ranks, routed.levels)
    main = expected if cfg.objective == "expected" else mixture
    total = main + cfg.balancing_weight * balancing
    if cfg.choice_balancing_weight:
        choices = choice_balancing(probs_BE, routed.chosen_BE, sum_over_ranks)
        total = total + cfg.choice_balancing_weight * choices
    usage_2E, entropy = manager_usage(probs_BE)
    return LossTerms(total, expected, mixture, balancing, usage_2E, entropy)
