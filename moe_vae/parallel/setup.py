"""One object that knows how this process takes part in the job, for the trainer to consult.

Single process, plain PyTorch: every helper is the identity. Under the DeepSpeed engine: the
process group, the expert-parallel group, and the few collectives the trainer needs (sum of the
balancing importance, averages for logging, gathering expert shards for figures/checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from moe_vae.config.schema import Config
from moe_vae.errors import MoeVaeError
from moe_vae.model.mixture import MixtureOfVAEs
from moe_vae.parallel.dist import DistInfo, check_cuda, init_distributed, launched_world_size
from moe_vae.parallel.groups import EXPERT_PREFIX, ExpertParallel

T = TypeVar("T")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_cuda(name)
    return torch.device(name)


@dataclass
class Parallel:
    info: DistInfo
    ep: ExpertParallel | None = None  # set when the DeepSpeed engine is used

    @property
    def distributed(self) -> bool:
        return self.ep is not None

    @property
    def is_main(self) -> bool:
        return self.info.rank == 0

    @property
    def expert_ids(self) -> range | None:
        return self.ep.experts if self.ep else None

    def sum_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        from moe_vae.parallel.dispatch import all_reduce_sum

        return all_reduce_sum(x) if self.info.world_size > 1 else x

    def mean_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """Average of a detached tensor over all ranks (logging only)."""
        if self.info.world_size == 1:
            return x
        import torch.distributed as dist

        out = x.detach().clone()
        dist.all_reduce(out)
        return out / self.info.world_size

    def gather_experts(self, x_E: torch.Tensor) -> torch.Tensor:
        """This rank's expert shard [E_l, ...] -> every expert [E, ...] (on every group rank)."""
        if self.ep is None or self.ep.size == 1:
            return x_E
        import torch.distributed as dist

        parts = [torch.empty_like(x_E) for _ in range(self.ep.size)]
        dist.all_gather(parts, x_E.contiguous(), group=self.ep.group)
        return torch.cat(parts)

    def clip_grad_norm(self, model: MixtureOfVAEs, max_norm: float) -> torch.Tensor:
        """Scales every gradient so that the whole model's gradient (all experts, every rank's
        shard) has norm at most `max_norm`, as torch's clip_grad_norm_ would in one process;
        returns that norm (on the device: no host sync). Without expert shards it is torch's
        clip_grad_norm_; with them, their squared norms are summed over the expert-parallel
        group, and the replicated parameters' gradients, alike on every rank, counted once.
        (DeepSpeed's ZeRO 0 clipping averages each rank's norm instead, and its bf16 optimizer
        there leaves the experts out.)"""
        if self.ep is None or self.ep.size == 1:
            return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

        def squares(names: list[str]) -> torch.Tensor:
            sq = [grads[n].detach().float().pow(2).sum() for n in names]
            return torch.stack(sq).sum() if sq else torch.zeros((), device=self.info.device)

        import torch.distributed as dist

        expert_sq = squares([n for n in grads if n.startswith(EXPERT_PREFIX)])
        dist.all_reduce(expert_sq, group=self.ep.group)
        norm = (squares([n for n in grads if not n.startswith(EXPERT_PREFIX)]) + expert_sq).sqrt()
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads.values():
            g.mul_(scale.to(g.dtype))
        return norm

    def sum_counts(self, counts: dict[str, int]) -> dict[str, int]:
        """Counters (e.g. bad samples by reason) summed over all ranks."""
        if self.info.world_size == 1:
            return dict(counts)
        import torch.distributed as dist

        every: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(every, dict(counts))
        total: dict[str, int] = {}
        for part in every:
            for key, value in part.items():
                total[key] = total.get(key, 0) + value
        return total

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value of a picklable object, on every rank."""
        if self.info.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """fn() on rank 0 alone (the run directory, its files), its result on every rank. An
        error it raises is raised on every rank, so none is left waiting in the next collective
        (to die of a closed connection under gloo, or until NCCL's timeout): a MoeVaeError as
        itself, which the command line has rank 0 report; anything else (a bug, an OSError
        nobody foresaw) as itself on rank 0, with its traceback, and named on the others."""
        if self.info.world_size == 1:
            return fn()
        result: Any = None
        error: Exception | None = None
        if self.is_main:
            try:
                result = fn()
            except Exception as err:
                error = err
        if error is None:
            said = None
        elif isinstance(error, MoeVaeError):
            said = str(error)
        else:
            said = f"rank 0 failed ({type(error).__name__}: {error})"
        failed, value = self.broadcast((True, said) if error else (False, result))
        if failed:
            raise error if error is not None else MoeVaeError(value)
        return value  # type: ignore[no-any-return]

    def barrier(self) -> None:
        if self.info.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def shutdown(self) -> None:
        """End of a successful run: leave together and free the process group, so no rank's
        communication threads are still running when the interpreter exits (gloo aborts)."""
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()


def setup_parallel(cfg: Config) -> Parallel:
    world = launched_world_size()
    engine = cfg.parallel.engine
    if engine == "plain" or (engine == "auto" and world == 1):
        if world > 1:
            raise MoeVaeError(
                f"parallel.engine=plain trains on one process, but the launcher started {world}: "
                f"use parallel.engine=deepspeed (or auto)"
            )
        return Parallel(DistInfo(0, 1, 0, pick_device(cfg.train.device)))
    from moe_vae.parallel.groups import check_ep_size, create_expert_parallel

    info = init_distributed(cfg.train.device)
    ep_size = check_ep_size(cfg.model.num_experts, info.world_size, cfg.parallel.ep_size)
    return Parallel(info, create_expert_parallel(cfg.model.num_experts, ep_size))


def parallelize(model: MixtureOfVAEs, par: Parallel, seed: int) -> None:
    """Expert parallelism applied from outside the model: the all-to-all dispatcher, distinct
    initial weights per expert shard, and DeepSpeed's MoE marks on the expert parameters."""
    if par.ep is None:
        return
    from moe_vae.model.experts import build_expert_bank
    from moe_vae.parallel.dispatch import AllToAllDispatcher
    from moe_vae.parallel.groups import attach_moe_marker, mark_expert_params

    ep = par.ep
    if ep.size > 1:
        if model.cfg.fused_input:
            raise MoeVaeError(
                f"model.fused_input needs every expert on one shard (the manager and the "
                f"experts must read the same inputs; expert-parallel size here: {ep.size}); "
                f"set parallel.ep_size: 1"
            )
        if model.cfg.expert_gemm == "grouped":
            raise MoeVaeError(
                f"model.expert_gemm=grouped runs on one expert shard only (expert-parallel size "
                f"here: {ep.size}); use model.expert_gemm: batched, or parallel.ep_size: 1"
            )
        model.dispatcher = AllToAllDispatcher(ep.group, ep.group_ranks)
        # Every rank built its shard from the same seed: re-draw it per shard so that experts
        # on different ranks start different (the replicated manager stays identical).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 7919 + ep.rank + 1)
            fresh = build_expert_bank(model.cfg, model.image_shape, len(ep.experts))
        model.experts.load_state_dict(fresh.state_dict())
    mark_expert_params(model.experts, ep.group_name)
    attach_moe_marker(model, ep, model.num_experts)
