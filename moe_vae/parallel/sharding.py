"""Whole-model state dicts from expert shards, and expert shards from whole-model state dicts.

Every expert parameter is stacked along the experts: its first dimension is E (StackedLinear) or
E blocks of channels (grouped convolutions), so viewing it as [E, -1] puts one expert per row.
A checkpoint always holds the whole model, so it loads on any number of ranks (any ep_size) and
on one CPU process without DeepSpeed.
"""

from __future__ import annotations

import torch

from moe_vae.model.mixture import MixtureOfVAEs
from moe_vae.parallel.setup import Parallel

EXPERT_PREFIX = "experts."


def full_state_dict(model: MixtureOfVAEs, par: Parallel) -> dict[str, torch.Tensor]:
    """The whole model, on CPU, on every rank (a collective under expert parallelism)."""
    out = {}
    E_l = model.experts.num_experts
    for name, value in model.state_dict().items():
        if name.startswith(EXPERT_PREFIX) and E_l != model.num_experts:
            value = par.gather_experts(value.reshape(E_l, -1)).reshape(-1, *value.shape[1:])
        out[name] = value.detach().cpu().contiguous()
    return out


def load_full_state_dict(model: MixtureOfVAEs, full: dict[str, torch.Tensor]) -> None:
    """Load a whole-model state dict into a model holding experts `model.expert_ids`."""
    ids = model.expert_ids
    local = {}
    for name, value in model.state_dict().items():
        if name not in full:
            raise KeyError(name)
        saved = full[name]
        if name.startswith(EXPERT_PREFIX) and len(ids) != model.num_experts:
            saved = saved.reshape(model.num_experts, -1)[ids.start : ids.stop].reshape(value.shape)
        local[name] = saved
    model.load_state_dict(local)
