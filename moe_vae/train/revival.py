"""Manager collapse: detect it from expert usage, and optionally revive dead experts.

A collapsing manager sends (almost) every input to a few experts; the rest stop learning because
the expected loss gives them no gradient. Revival makes a dead expert a perturbed copy of a busy
one and splits the busy expert's manager logit between the two (each gets half its probability),
so the pair then competes for that expert's inputs and they can specialise apart.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from moe_vae.model.manager import Manager
from moe_vae.model.mixture import MixtureOfVAEs
from moe_vae.parallel.setup import Parallel
from moe_vae.parallel.sharding import EXPERT_PREFIX, sync_master_weights, zero_optimizer


def collapse_message(share: list[float], max_share: float) -> str | None:
    """A warning when one expert took more than `max_share` of the inputs this epoch."""
    if len(share) < 2 or max(share) <= max_share:
        return None
    top = max(range(len(share)), key=share.__getitem__)
    return (
        f"manager collapse: expert {top} took {share[top]:.0%} of the inputs this epoch "
        f"(train.collapse_share={max_share}); consider loss.balancing_weight or "
        f"train.revive_dead_experts"
    )


def pick_pairs(share: list[float], dead_below: float) -> list[tuple[int, int]]:
    """(dead expert, donor) pairs: the dead in index order, donors the busiest first."""
    dead = [i for i, s in enumerate(share) if s < dead_below]
    busy = sorted((i for i, s in enumerate(share) if s >= dead_below), key=lambda i: -share[i])
    return [(d, busy[k % len(busy)]) for k, d in enumerate(dead)] if busy else []


@torch.no_grad()
def revive(
    model: MixtureOfVAEs,
    optim: Any,
    par: Parallel,
    pairs: list[tuple[int, int]],
    noise: float,
    seed: int,
) -> None:
    """Copy each donor into its dead expert (every rank, the same decisions and perturbation;
    a collective under expert parallelism). Adam's moments of the revived experts restart
    from zero where the optimizer state is per parameter (plain Adam, ZeRO 0)."""
    if not pairs:
        return
    gen = torch.Generator().manual_seed(seed)
    ids = model.expert_ids
    E, E_l = model.num_experts, len(ids)
    for name, p in model.named_parameters():
        if not name.startswith(EXPERT_PREFIX):
            continue
        rows = p.data.view(E_l, -1)
        full = par.gather_experts(rows.clone())  # [E, -1]: donors may live on other ranks
        for dead, donor in pairs:
            jitter = torch.randn(full.shape[1], generator=gen).to(full) * noise
            if ids.start <= dead < ids.stop:
                scale = full[donor].abs().mean()
                rows[dead - ids.start] = full[donor] + jitter * scale
                _reset_moments(optim, p, E_l, dead - ids.start)
        del full
    assert isinstance(model.manager, Manager), "revival needs a flat manager (config-checked)"
    last = model.manager.layers[-1]  # logits: a row per expert
    assert isinstance(last, nn.Linear)
    for dead, donor in pairs:
        last.weight[dead] = last.weight[donor]
        last.bias[donor] -= math.log(2.0)
        last.bias[dead] = last.bias[donor]
    for param in (last.weight, last.bias):
        for dead, _ in pairs:
            _reset_moments(optim, param, E, dead)
    sync_master_weights(optim)  # ZeRO 1/2: its fp32 copy must follow


def _reset_moments(optim: Any, p: torch.Tensor, rows: int, row: int) -> None:
    if zero_optimizer(optim) is not None:  # moments live in flat partitions: left as they are
        return
    state = optim.state.get(p)
    if not state:
        return
    for value in state.values():
        if torch.is_tensor(value) and value.shape == p.shape:
            value.view(rows, -1)[row] = 0
