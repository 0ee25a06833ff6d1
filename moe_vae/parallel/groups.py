"""Expert-parallel groups, made and registered with DeepSpeed's own MoE machinery.

With world size W and expert-parallel size P (P divides W), ranks [0..P-1], [P..2P-1], ... each
hold all E experts between them (E/P per rank, expert ids ep_rank*E/P ...), and the ranks holding
the same experts form an expert-data-parallel group over which DeepSpeed reduces their gradients.
Expert parameters carry DeepSpeed's MoE marks (`allreduce=False`, `group_name`), and a marker
module tells the engine the model has MoE layers, so its optimizer, ZeRO partitioning and
checkpoints treat them as experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import nn

from moe_vae.errors import MoeVaeError

EXPERT_PREFIX = "experts."  # the expert bank's parameters: sharded over the expert-parallel group


@dataclass(frozen=True)
class ExpertParallel:
    size: int  # ranks per expert-parallel group
    rank: int  # this rank's position in its group
    group: dist.ProcessGroup
    group_ranks: list[int]  # global ranks of the group, in group order
    group_name: str  # DeepSpeed's name for it: "ep_size_<size>"
    experts: range  # global ids of the experts on this rank


def check_ep_size(num_experts: int, world_size: int, ep_size: int | None) -> int:
    """The expert-parallel size to use (null: every rank, when the experts divide evenly)."""
    size = ep_size or world_size
    if world_size % size:
        raise MoeVaeError(
            f"parallel.ep_size={size} must divide the number of processes ({world_size})"
        )
    if num_experts % size:
        raise MoeVaeError(
            f"model.num_experts={num_experts} is not divisible by parallel.ep_size={size}: "
            f"uneven expert shards are not supported; pick an ep_size that divides it"
        )
    return size


def create_expert_parallel(num_experts: int, ep_size: int) -> ExpertParallel:
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    group = groups._get_expert_parallel_group(name)
    rank = groups._get_expert_parallel_rank(name)
    per_rank = num_experts // ep_size
    return ExpertParallel(
        ep_size,
        rank,
        group,
        dist.get_process_group_ranks(group),
        name,
        range(rank * per_rank, (rank + 1) * per_rank),
    )


def mark_expert_params(bank: nn.Module, group_name: str) -> None:
    """DeepSpeed's marks for expert parameters (what deepspeed.moe's Experts sets)."""
    for param in bank.parameters():
        param.allreduce = False  # type: ignore[attr-defined]
        param.group_name = group_name  # type: ignore[attr-defined]


def attach_moe_marker(model: nn.Module, ep: ExpertParallel, num_experts: int) -> None:
    """Register a parameter-free deepspeed.moe MoE subclass on the model: the engine detects MoE
    layers by that type. Its set_deepspeed_parallelism finds the groups already made above."""
    from deepspeed.moe.layer import MoE

    class ExpertParallelMarker(MoE):
        def __init__(self) -> None:
            nn.Module.__init__(self)  # no gate or experts of DeepSpeed's own: ours are elsewhere
            self.num_experts, self.ep_size = num_experts, ep.size
            self.expert_group_name = ep.group_name
            self.num_local_experts = len(ep.experts)

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # the groups exist already (create_expert_parallel)

        def forward(self, *args, **kwargs):  # type: ignore[override]
            raise RuntimeError("ExpertParallelMarker is a marker, not a layer")

    model.ep_marker = ExpertParallelMarker()
