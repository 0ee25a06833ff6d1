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


def _optimizer_tensor_state(optim: torch.optim.Optimizer) -> dict[int, dict[str, object]]:
    return {
        id(p): optim.state[p]
        for group in optim.param_groups
        for p in group["params"]
        if p in optim.state
    }


def full_optimizer_state(
    model: MixtureOfVAEs, optim: torch.optim.Optimizer, par: Parallel
) -> dict[str, dict[str, object]]:
    """Per-parameter optimizer state by parameter name, expert shards gathered like the weights,
    so it reloads on any number of ranks (a collective under expert parallelism)."""
    state = _optimizer_tensor_state(optim)
    E_l = model.experts.num_experts
    out: dict[str, dict[str, object]] = {}
    for name, p in model.named_parameters():  # the same order on every rank
        entry: dict[str, object] = {}
        for key, value in sorted(state.get(id(p), {}).items()):
            if torch.is_tensor(value) and value.shape == p.shape:
                if name.startswith(EXPERT_PREFIX) and E_l != model.num_experts:
                    value = par.gather_experts(value.reshape(E_l, -1)).reshape(-1, *p.shape[1:])
                value = value.detach().cpu().clone()
            entry[key] = value
        if entry:
            out[name] = entry
    return out


def load_full_optimizer_state(
    model: MixtureOfVAEs, optim: torch.optim.Optimizer, full: dict[str, dict[str, object]]
) -> None:
    """Put saved per-parameter state (whole model) into `optim`, keeping this rank's experts."""
    ids = model.expert_ids
    for name, p in model.named_parameters():
        if name not in full:
            continue
        sharded = name.startswith(EXPERT_PREFIX) and len(ids) != model.num_experts
        entry: dict[str, object] = {}
        for key, value in full[name].items():
            if torch.is_tensor(value) and value.dim() > 0:  # moments ('step' is 0-d)
                if sharded:
                    value = value.reshape(model.num_experts, -1)[ids.start : ids.stop]
                    value = value.reshape(p.shape)
                value = value.to(p.device)
            entry[key] = value
        optim.state[p] = entry
