"""The manager (gating network): x -> softmax over the E experts.

Legend: B batch, D flattened input, E experts.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from moe_vae.model.layers import activation


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
