"""Expert-parallel routing over all-to-all, behind the model's Dispatcher interface.

Legend: G ranks in the expert-parallel group, B inputs per rank, D input, E_l experts per rank.
Dense routing (the seed's loss: every expert sees every input): each rank gathers the group's
inputs [G*B, D], runs its E_l experts on all of them, and an all-to-all returns each input's
losses [E_l] from every rank to the input's owner, which then holds [B, E] in global expert order.
Top-k routing: each rank lays its inputs out per chosen expert with a fixed capacity C ([E, C, D],
so the all-to-all has equal splits), sends expert e's slots to the rank holding e, which runs
its experts on [E_l, G*C, D] and sends the losses back the same way.
The all-to-all is differentiable: its backward is the reverse all-to-all, so expert gradients
reach the ranks holding the experts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from moe_vae.model.dispatch import LocalLosses, capacity, pack, plan_slots, unpack


class _AllToAll(torch.autograd.Function):
    """[G, ...] chunk g goes to group rank g; the reply's chunk g came from group rank g."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()  # empty_like keeps a view's strides: make both plain row-major
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the gradient is summed too (every rank uses the summed value)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = grad.clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Differentiable sum over ranks (for the balancing term's importance vector)."""
    return _AllReduceSum.apply(x, group)


class AllToAllDispatcher:
    """Expert-parallel routing (dense or top-k) within one expert-parallel group."""

    def __init__(self, group: dist.ProcessGroup, group_ranks: list[int]) -> None:
        self.group, self.group_ranks = group, group_ranks

    def expert_losses(self, x_BD: torch.Tensor, local_losses: LocalLosses) -> torch.Tensor:
        G, B = len(self.group_ranks), len(x_BD)
        gathered = [torch.empty_like(x_BD) for _ in range(G)]
        dist.all_gather(gathered, x_BD.contiguous(), group=self.group)  # inputs carry no grad
        # Global batch positions (rank-major), so per-sample noise can match one device's.
        ids_N = torch.cat([r * B + torch.arange(B, device=x_BD.device) for r in self.group_ranks])
        loss_EN = local_losses(torch.cat(gathered), ids_N, None)  # [E_l, G*B]
        E_l = loss_EN.shape[0]
        send_GEB = loss_EN.view(E_l, G, B).transpose(0, 1)  # chunk g: group rank g's inputs
        recv_GEB = _AllToAll.apply(send_GEB, self.group)  # chunk g: group rank g's experts
        return recv_GEB.reshape(G * E_l, B).transpose(0, 1)  # [B, E], experts in global order

    def expert_losses_topk(
        self,
        x_BD: torch.Tensor,
        idx_BK: torch.Tensor,
        local_losses: LocalLosses,
        num_experts: int,
        capacity_factor: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        G, (B, K), D = len(self.group_ranks), idx_BK.shape, x_BD.shape[1]
        E_l = num_experts // G
        slot_P, counts_E = plan_slots(idx_BK, num_experts)
        if capacity_factor == 0:  # dropless: the busiest expert's queue, agreed by the group
            busiest = counts_E.max().reshape(1)
            dist.all_reduce(busiest, op=dist.ReduceOp.MAX, group=self.group)
            cap = max(int(busiest), 1)
        else:
            cap = capacity(B, K, num_experts, capacity_factor)
        x_ECD, ids_EC, kept_P = pack(
            x_BD, idx_BK, slot_P, cap, num_experts, id_offset=dist.get_rank() * B
        )
        # Expert e's slots go to the group rank holding e: chunk g = experts g*E_l..(g+1)*E_l.
        x_in = _AllToAll.apply(x_ECD.view(G, E_l, cap, D), self.group)
        ids_in = torch.empty_like(ids_EC)
        dist.all_to_all_single(ids_in, ids_EC.contiguous(), group=self.group)
        loss_LN = local_losses(
            x_in.transpose(0, 1).reshape(E_l, G * cap, D),
            ids_in.view(G, E_l, cap).transpose(0, 1).reshape(E_l, G * cap),
            None,
        )
        # Back to the inputs' owners: chunk g of the reply holds group rank g's experts.
        loss_back = _AllToAll.apply(loss_LN.view(E_l, G, cap).transpose(0, 1), self.group)
        loss_EC = loss_back.reshape(num_experts, cap)
        return unpack(loss_EC, idx_BK, slot_P, kept_P), kept_P.view(B, K)
