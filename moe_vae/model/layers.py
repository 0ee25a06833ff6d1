"""Building blocks shared by the manager and the expert banks.

Legend: E experts, B batch, I / O layer input / output features, R rows of a grouped layout
(inputs sorted by expert, each expert's rows contiguous: see model/dispatch.py `Groups`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from moe_vae.model.grouped import Groups, grouped_linear

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid,
    "relu": F.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "silu": F.silu,
    "elu": F.elu,
    "leaky_relu": F.leaky_relu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}, expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class StackedLinear(nn.Module):
    """E independent linear layers stored as one [E, I, O] weight: one batched matmul for all.

    Initialised like nn.Linear (uniform ±1/sqrt(I) for weight and bias), expert by expert.
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight_EIO = nn.Parameter(torch.empty(num_experts, in_features, out_features))
        self.bias_EO = nn.Parameter(torch.empty(num_experts, out_features))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight_EIO, -bound, bound)
        nn.init.uniform_(self.bias_EO, -bound, bound)

    def forward(
        self,
        h: torch.Tensor,
        experts: torch.Tensor | None = None,
        groups: Groups | None = None,
    ) -> torch.Tensor:
        """h: [B, I] (one input shared by every expert) or [E, B, I] -> [E, B, O]; with
        `groups`, h is [R, I] (rows grouped by expert) -> [R, O], one grouped GEMM.

        `experts` (indices) selects a subset of the stacked experts; h then has that many rows.
        """
        w_EIO: torch.Tensor = self.weight_EIO
        b_EO: torch.Tensor = self.bias_EO
        if groups is not None:
            return grouped_linear(h, w_EIO, b_EO, groups)
        if experts is not None:
            w_EIO, b_EO = w_EIO[experts], b_EO[experts]
        if h.dim() == 2:
            # Shared input: one batched GEMM over a broadcast (not copied) input. Measured on
            # CPU, 2.5x faster than one [B, I] x [I, E*O] GEMM, whose weight view must be copied
            # into that layout at every call (and its gradient copied back).
            h = h.expand(w_EIO.shape[0], *h.shape)
        return torch.baddbmm(b_EO[:, None, :], h, w_EIO)


class StackedMLP(nn.Module):
    """A stack of StackedLinear layers with an activation between them (none after the last)."""

    def __init__(self, num_experts: int, widths: list[int], act: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(StackedLinear(num_experts, i, o) for i, o in pairwise(widths))
        self.act = activation(act)

    def forward(
        self,
        h: torch.Tensor,
        experts: torch.Tensor | None = None,
        groups: Groups | None = None,
    ) -> torch.Tensor:
        for k, layer in enumerate(self.layers):
            if k:
                h = self.act(h)
            h = layer(h, experts, groups)
        return h


class FusedInputLayer(nn.Module):
    """The first layers of the manager (width M) and of E experts (width H each), which all
    read the same input, as one [I, M + E*H] weight: one GEMM for all of them, forward and
    backward. Initialised like the layers it replaces (uniform ±1/sqrt(I))."""

    def __init__(self, in_features: int, manager_width: int, num_experts: int, width: int) -> None:
        super().__init__()
        self.manager_width, self.num_experts, self.width = manager_width, num_experts, width
        out_features = manager_width + num_experts * width
        self.weight_IF = nn.Parameter(torch.empty(in_features, out_features))
        self.bias_F = nn.Parameter(torch.empty(out_features))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight_IF, -bound, bound)
        nn.init.uniform_(self.bias_F, -bound, bound)

    def forward(self, x_BI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, I] -> (manager's pre-activation [B, M], experts' pre-activation [E, B, H])."""
        h_BF = torch.addmm(self.bias_F, x_BI, self.weight_IF)
        M, E, H = self.manager_width, self.num_experts, self.width
        return h_BF[:, :M], h_BF[:, M:].view(-1, E, H).transpose(0, 1)
