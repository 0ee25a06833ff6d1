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

from moe_vae.evaluate.metrics import in_use
from moe_vae.model.manager import Manager
from moe_vae.model.mixture import MixtureOfVAEs
from moe_vae.parallel.setup import Parallel
from moe_vae.parallel.sharding import (
    EXPERT_PREFIX,
    MASTER_KEY,
    local_optimizer_state,
    local_optimizer_state_setter,
)


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


def pick_pairs(share: list[float], min_fraction: float) -> list[tuple[int, int]]:
    """(dead expert, donor) pairs: the dead (not in use) in index order, donors the busiest
    first."""
    alive = in_use(share, min_fraction)
    dead = [i for i in range(len(share)) if not alive[i]]
    busy = sorted((i for i in range(len(share)) if alive[i]), key=lambda i: -share[i])
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
    a collective under expert parallelism and ZeRO). Adam's moments are copied with the weights:
    zeroed moments under a step count in the thousands would make the revived expert's first
    updates many times the learning rate. Where DeepSpeed keeps fp32 master weights (bf16/fp16),
    the copy is made in the masters and only the revived rows change: refreshing every master
    from the rounded module would round the whole model once per revival."""
    if not pairs:
        return
    gen = torch.Generator().manual_seed(seed)
    ids = model.expert_ids
    get, put = local_optimizer_state(optim), local_optimizer_state_setter(optim)
    for name, p in model.named_parameters():
        if not name.startswith(EXPERT_PREFIX):
            continue
        entry = _state_with_master(get, p)
        for key, value in _rows_of(entry, p).items():
            rows = value.view(len(ids), -1)
            full = par.gather_experts(rows.clone())  # [E, -1]: donors may live on other ranks
            for dead, donor in pairs:
                if key == MASTER_KEY:  # drawn on every rank: the same stream everywhere
                    jitter = torch.randn(full.shape[1], generator=gen).to(full) * noise
                    new = full[donor] + jitter * full[donor].abs().mean()
                else:
                    new = full[donor]
                if ids.start <= dead < ids.stop:
                    rows[dead - ids.start] = new
            del full
        put(p, entry)
    assert isinstance(model.manager, Manager), "revival needs a flat manager (config-checked)"
    last = model.manager.layers[-1]  # logits: a row per expert
    assert isinstance(last, nn.Linear)
    for kind, logits in last.named_parameters():  # weight and bias
        entry = _state_with_master(get, logits)
        for key, value in _rows_of(entry, logits).items():
            for dead, donor in pairs:
                if key == MASTER_KEY and kind == "bias":
                    value[donor] -= math.log(2.0)
                value[dead] = value[donor]
        put(logits, entry)


def _state_with_master(get: Any, p: torch.nn.Parameter) -> dict[str, object]:
    """p's optimizer state with its fp32 master weight under MASTER_KEY (p itself, as fp32,
    where the optimizer keeps no copy)."""
    entry: dict[str, object] = get(p)
    if not isinstance(entry.get(MASTER_KEY), torch.Tensor):
        entry[MASTER_KEY] = p.detach().float()
    return entry


def _rows_of(entry: dict[str, object], p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    """The tensors with a row per expert: the master weight and Adam's moments."""
    return {
        key: value
        for key, value in entry.items()
        if isinstance(value, torch.Tensor) and value.shape == p.shape
    }
