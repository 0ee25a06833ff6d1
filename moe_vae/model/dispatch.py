"""How inputs reach the experts and per-expert losses come back to the inputs' owner.

Legend: B this rank's batch, K experts per input (top-k), N inputs an expert sees, E all experts,
E_l experts on this rank, C capacity (input slots per expert), D input.

`local_losses(x, ids, groups=None)` runs this rank's experts and returns their losses [E_l, N];
x is [N, D] (one batch for every expert: dense routing) or [E_l, N, D] (a batch per expert:
top-k), and ids (the same shape without D) are the inputs' positions in the global batch
(rank-major), so per-sample latent noise can be made identical however the experts are sharded.
With `groups` (top-k with grouped GEMM, model/grouped.py), x is [R, D] rows grouped by expert
and the losses are [R].

The local dispatcher here holds every expert; the all-to-all one lives in moe_vae.parallel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from moe_vae.model.grouped import Groups, pack_grouped, unpack_grouped

LocalLosses = Callable[[torch.Tensor, torch.Tensor, Groups | None], torch.Tensor]


class Dispatcher(Protocol):
    def expert_losses(self, x_BD: torch.Tensor, local_losses: LocalLosses) -> torch.Tensor:
        """Dense: loss of every expert on every input of this rank, [B, E]."""
        ...

    def expert_losses_topk(
        self,
        x_BD: torch.Tensor,
        idx_BK: torch.Tensor,
        local_losses: LocalLosses,
        num_experts: int,
        capacity_factor: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k: (loss of each chosen expert [B, K], kept [B, K] (False = dropped))."""
        ...


def capacity(tokens: int, k: int, num_experts: int, factor: float) -> int:
    """Input slots per expert: factor * (tokens * k / E), at least 1."""
    return max(1, math.ceil(factor * tokens * k / num_experts))


def plan_slots(idx_BK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (input, choice) pair's slot in its expert's queue, first come first served in batch
    order: (slot [B*K], inputs per expert [E])."""
    e_P = idx_BK.flatten()
    order = torch.argsort(e_P, stable=True)
    # Not bincount: its output size depends on the data, a host sync on a GPU.
    counts_E = torch.zeros(num_experts, dtype=e_P.dtype, device=e_P.device)
    counts_E.scatter_add_(0, e_P, torch.ones_like(e_P))
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    slot_P = torch.empty_like(e_P)
    slot_P[order] = torch.arange(len(e_P), device=e_P.device) - starts_E[e_P[order]]
    return slot_P, counts_E


def pack(
    x_BD: torch.Tensor,
    idx_BK: torch.Tensor,
    slot_P: torch.Tensor,
    cap: int,
    num_experts: int,
    id_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs laid out per expert: (x [E, C, D] (zeros in empty slots), global ids [E, C],
    kept [B*K]: pairs beyond an expert's capacity are dropped)."""
    B, K = idx_BK.shape
    E, D = num_experts, x_BD.shape[1]
    e_P, kept_P = idx_BK.flatten(), slot_P < cap
    b_P = torch.arange(B * K, device=x_BD.device) // K  # input of each pair, k-minor
    # No boolean indexing (a host sync on a GPU): dropped pairs write to one spare row past
    # the E*C slots, which is cut off.
    flat_P = torch.where(kept_P, e_P * cap + slot_P, E * cap)
    x_SD = x_BD.new_zeros(E * cap + 1, D)
    ids_S = torch.zeros(E * cap + 1, dtype=torch.long, device=x_BD.device)
    x_SD[flat_P] = x_BD[b_P]
    ids_S[flat_P] = b_P + id_offset
    return x_SD[: E * cap].view(E, cap, D), ids_S[: E * cap].view(E, cap), kept_P


def unpack(
    loss_EC: torch.Tensor, idx_BK: torch.Tensor, slot_P: torch.Tensor, kept_P: torch.Tensor
) -> torch.Tensor:
    """Each pair's loss back in [B, K] order (0 where dropped)."""
    e_P = idx_BK.flatten()
    slot_P = slot_P.clamp(max=loss_EC.shape[1] - 1)  # a dropped pair's slot may lie past C
    loss_P = loss_EC[e_P, slot_P]
    return torch.where(kept_P, loss_P, torch.zeros_like(loss_P)).view(idx_BK.shape)


class LocalDispatcher:
    """All experts on this device. Top-k lays the inputs out per expert either padded to the
    capacity ([E, C, D], one batched matmul per layer) or, with `grouped`, as jagged groups of
    rows (one grouped GEMM per layer; the same pairs are dropped over capacity)."""

    def __init__(self, grouped: bool = False) -> None:
        self.grouped = grouped

    def expert_losses(self, x_BD: torch.Tensor, local_losses: LocalLosses) -> torch.Tensor:
        ids_B = torch.arange(len(x_BD), device=x_BD.device)
        return local_losses(x_BD, ids_B, None).transpose(0, 1)

    def expert_losses_topk(
        self,
        x_BD: torch.Tensor,
        idx_BK: torch.Tensor,
        local_losses: LocalLosses,
        num_experts: int,
        capacity_factor: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        slot_P, counts_E = plan_slots(idx_BK, num_experts)
        B, K = idx_BK.shape
        cap = (
            max(int(counts_E.max()), 1)
            if capacity_factor == 0
            else capacity(B, K, num_experts, capacity_factor)
        )
        if self.grouped:
            kept_P = slot_P < cap
            x_RD, ids_R, groups, row_P = pack_grouped(x_BD, idx_BK, slot_P, kept_P, num_experts)
            loss_R = local_losses(x_RD, ids_R, groups)
            return unpack_grouped(loss_R, row_P, kept_P).view(B, K), kept_P.view(B, K)
        x_ECD, ids_EC, kept_P = pack(x_BD, idx_BK, slot_P, cap, num_experts)
        loss_EC = local_losses(x_ECD, ids_EC, None)
        return unpack(loss_EC, idx_BK, slot_P, kept_P), kept_P.view(B, K)
