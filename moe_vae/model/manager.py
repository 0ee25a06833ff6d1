"""The manager (gating network): x -> softmax over the E experts.

Legend: B batch, D flattened input, E experts.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
from torch import nn

from moe_vae.model.layers import StackedMLP, activation


class Manager(nn.Module):
    """A feed-forward network D -> manager_layers -> E logits."""

    def __init__(self, input_dim: int, layers: list[int], num_experts: int, act: str) -> None:
        super().__init__()
        widths = [input_dim, *layers, num_experts]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in pairwise(widths))
        self.act = activation(act)

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Logits [B, E]; softmax of them is the manager's probability over experts."""
        h = x_BD
        for k, layer in enumerate(self.layers):
            if k:
                h = self.act(h)
            h = layer(h)
        return h


class HierarchicalManager(nn.Module):
    """Managers on every level of a hierarchy [n_1, ..., n_L]: the top manager picks one of n_1
    experts; each node of level l-1 has its own manager over its n_l children (all of one level
    stacked, one batched matmul per layer). Returns leaf log-probabilities [B, n_1 ... n_L],
    log p(leaf) = Σ_l log p(node_l | node_{l-1}), leaves in row-major order (leaf of path
    (i_1, ..., i_L) is ((i_1 n_2) + i_2) n_3 + ...). softmax of them is p(leaf) itself, so the
    rest of the model treats them as logits over the leaves.
    """

    def __init__(self, input_dim: int, layers: list[int], levels: list[int], act: str) -> None:
        super().__init__()
        self.levels = levels
        self.top = Manager(input_dim, layers, levels[0], act)
        parents = [math.prod(levels[:l]) for l in range(1, len(levels))]
        self.sub = nn.ModuleList(
            StackedMLP(p, [input_dim, *layers, n], act)
            for p, n in zip(parents, levels[1:], strict=True)
        )

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        logp_BP = self.top(x_BD).log_softmax(-1)  # P: nodes of the current level
        for manager in self.sub:
            logp_PBN = manager(x_BD).log_softmax(-1)
            logp_BPN = logp_BP[:, :, None] + logp_PBN.permute(1, 0, 2)
            logp_BP = logp_BPN.flatten(1)
        return logp_BP


def cluster_log_probs(logits_BE: torch.Tensor, levels: list[int] | None) -> torch.Tensor:
    """Log-probabilities (up to a constant per row) over the top-level experts: the leaves'
    summed in log space under a hierarchy; the manager's logits themselves without one."""
    if not levels:
        return logits_BE
    return logits_BE.log_softmax(-1).reshape(len(logits_BE), levels[0], -1).logsumexp(-1)
