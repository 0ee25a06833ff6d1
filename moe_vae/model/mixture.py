"""MixtureOfVAEs: the manager routes each input over the expert bank.

Legend: B batch, D flattened input, E experts (E_l of them on this rank), Z latent, N samples.
The bank holds the experts `expert_ids` (all of them on one device; a shard of them under expert
parallelism). Which experts see which inputs is the dispatcher's business (model/dispatch.py):
the model never imports torch.distributed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moe_vae.config.schema import LossConfig, ModelConfig
from moe_vae.model.dispatch import Dispatcher, LocalDispatcher
from moe_vae.model.experts import build_expert_bank
from moe_vae.model.grouped import Groups
from moe_vae.model.layers import FusedInputLayer, activation
from moe_vae.model.losses import elbo_losses
from moe_vae.model.manager import HierarchicalManager, Manager, cluster_log_probs

# eps for (expert ids, global sample ids, z_dim) -> [..., Z], the two ids broadcast together:
# [E_l, 1] with [N] or [E_l, N], or [R] with [R] (grouped rows); None = torch.randn.
NoiseFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class Routed:
    """What the loss needs from one forward pass."""

    logits_BE: torch.Tensor  # manager logits over all experts
    loss_BE: torch.Tensor  # L_i(x) where routed (0 elsewhere)
    mask_BE: torch.Tensor | None = None  # top-k: which (input, expert) pairs were computed
    dropped: torch.Tensor | None = None  # top-k: pairs over capacity (a 0-d count)
    chosen_BE: torch.Tensor | None = None  # top-k: the manager's choices, dropped ones too
    levels: list[int] | None = None  # a hierarchical mixture's level sizes (per-level balancing)


@dataclass
class MixtureOutput:
    logits_BE: torch.Tensor  # manager logits
    probs_BE: torch.Tensor  # softmax(logits_BE)
    mu_EBZ: torch.Tensor  # the bank's experts only
    var_EBZ: torch.Tensor
    z_EBZ: torch.Tensor
    x_logits_EBD: torch.Tensor  # decoder logits; sigmoid gives the reconstruction


class MixtureOfVAEs(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        image_shape: tuple[int, int, int],
        expert_ids: range | None = None,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_shape = image_shape
        self.input_dim = math.prod(image_shape)
        self.num_experts = cfg.num_experts
        self.expert_ids = expert_ids if expert_ids is not None else range(cfg.num_experts)
        self.num_clusters = cfg.num_clusters
        self.input_layer: FusedInputLayer | None = None
        if cfg.fused_input:  # the manager and the experts then start after their first layer
            self.input_layer = FusedInputLayer(
                self.input_dim, cfg.manager_layers[0], len(self.expert_ids), cfg.encoder_layers[0]
            )
            self.act = activation(cfg.activation)
        self.manager: nn.Module
        if cfg.hierarchy:
            self.manager = HierarchicalManager(
                self.input_dim, cfg.manager_layers, cfg.hierarchy, cfg.activation
            )
        elif cfg.fused_input:  # reads the fused layer's manager part, [B, manager_layers[0]]
            self.manager = Manager(
                cfg.manager_layers[0], cfg.manager_layers[1:], cfg.num_experts, cfg.activation
            )
        else:
            self.manager = Manager(
                self.input_dim, cfg.manager_layers, cfg.num_experts, cfg.activation
            )
        self.experts = build_expert_bank(cfg, image_shape, len(self.expert_ids))
        self.dispatcher: Dispatcher = dispatcher or LocalDispatcher(
            grouped=cfg.expert_gemm == "grouped"
        )
        self.noise: NoiseFn | None = None

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the weights are stored in (bf16 under train.precision=bf16-true): inputs
        and latents are cast to it on the way in, outputs and logits leave in fp32."""
        return next(self.experts.parameters()).dtype

    def _inputs(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the manager and the expert bank read: the input itself, or with
        model.fused_input their activated first layers ([B, M] and [E, B, H]) from one GEMM."""
        x_BD = x_BD.to(self.weight_dtype)
        if self.input_layer is None:
            return x_BD, x_BD
        h_BM, h_EBH = self.input_layer(x_BD)
        return self.act(h_BM), self.act(h_EBH)

    def manager_logits(self, x_BD: torch.Tensor) -> torch.Tensor:
        """The manager's logits over all experts [B, E] (alone: eval, assign, label replay)."""
        x_BD = x_BD.to(self.weight_dtype)
        if self.input_layer is None:
            return self.manager(x_BD).float()
        M = self.input_layer.manager_width  # the manager's columns of the fused layer only
        h_BM = torch.addmm(self.input_layer.bias_F[:M], x_BD, self.input_layer.weight_IF[:, :M])
        return self.manager(self.act(h_BM)).float()

    def forward(
        self, x_BD: torch.Tensor, generator: torch.Generator | None = None
    ) -> MixtureOutput:
        """Manager over all experts, and this bank's experts on every input."""
        manager_in, experts_in = self._inputs(x_BD)
        logits_BE = self.manager(manager_in).float()
        out = self.experts(experts_in, generator=generator)
        return MixtureOutput(
            logits_BE,
            logits_BE.softmax(-1),
            out.mu_EBZ.float(),
            out.var_EBZ.float(),
            out.z_EBZ.float(),
            out.x_logits_EBD.float(),
        )

    def losses(
        self,
        x_BD: torch.Tensor,
        loss_cfg: LossConfig,
        generator: torch.Generator | None = None,
        capacity_factor: float | None = None,
    ) -> Routed:
        """The manager's logits and the routed experts' losses L_i(x) on this rank's inputs.
        `capacity_factor` (top-k): overrides the config's; 0 = dropless, what evaluation uses
        (it renormalises over the computed pairs: a dropped input would have none)."""

        def local_losses(x: torch.Tensor, ids: torch.Tensor, groups: Groups | None) -> torch.Tensor:
            eps = None
            if self.noise is not None:  # tests: noise fixed per (expert id, input id)
                r = self.expert_ids  # arange, not torch.tensor(list): no copy from the host
                ids_E = torch.arange(r.start, r.stop, r.step, device=x.device)
                experts = ids_E[:, None] if groups is None else ids_E[groups.expert_R]
                eps = self.noise(experts, ids, self.cfg.z_dim)
            # Fused: dense routing on one shard (config- and parallelize-checked), so x is
            # x_BD and the experts read their first layer's output computed with the manager's.
            experts_in = x.to(self.weight_dtype) if experts_in_fused is None else experts_in_fused
            out = self.experts(experts_in, generator=generator, eps_EBZ=eps, groups=groups)
            return elbo_losses(x, out, loss_cfg)

        manager_in, experts_in_BD = self._inputs(x_BD)
        experts_in_fused = experts_in_BD if self.input_layer is not None else None
        # Routing and the loss read fp32 logits whatever the manager ran in (bf16).
        logits_BE = self.manager(manager_in).float()
        if self.cfg.routing == "dense":
            loss_BE = self.dispatcher.expert_losses(x_BD, local_losses)
            return Routed(logits_BE, loss_BE, levels=self.cfg.hierarchy)
        scores_BE = logits_BE.detach()
        if self.training and self.cfg.route_noise == "gumbel":
            # logits + Gumbel(0, 1) noise, −log(−log U): their top k is a sample of k experts
            # without replacement from the manager's probabilities. From a uniform draw, not
            # exponential_: on a CPU that ran at ~20 ns an element (79 ms for 4096 × 1024).
            u_BE = torch.rand(scores_BE.shape, generator=generator, device=scores_BE.device)
            scores_BE = scores_BE - u_BE.log().neg().log()
        idx_BK = scores_BE.topk(self.cfg.top_k, dim=-1).indices
        loss_BK, kept_BK = self.dispatcher.expert_losses_topk(
            x_BD,
            idx_BK,
            local_losses,
            self.num_experts,
            self.cfg.capacity_factor if capacity_factor is None else capacity_factor,
        )
        loss_BE = logits_BE.new_zeros(logits_BE.shape).scatter(1, idx_BK, loss_BK)
        mask_BE = torch.zeros_like(logits_BE, dtype=torch.bool).scatter(1, idx_BK, kept_BK)
        chosen_BE = torch.zeros_like(mask_BE).scatter(1, idx_BK, True)
        return Routed(logits_BE, loss_BE, mask_BE, (~kept_BK).sum(), chosen_BE=chosen_BE)

    def cluster_logits(self, logits_BE: torch.Tensor) -> torch.Tensor:
        """The manager's logits over the top-level experts (the clusters): [B, num_clusters]."""
        return cluster_log_probs(logits_BE, self.cfg.hierarchy)

    @torch.no_grad()
    def assign(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Cluster id of each input: the manager's argmax over the top-level experts, [B]."""
        return self.cluster_logits(self.manager_logits(x_BD)).argmax(-1)

    def _local_index(self, expert: int) -> int:
        if not 0 <= expert < self.num_experts:
            raise ValueError(
                f"expert index {expert} out of range: "
                f"this model has experts 0..{self.num_experts - 1}"
            )
        if expert not in self.expert_ids:
            raise ValueError(f"expert {expert} is not held here (this shard: {self.expert_ids})")
        return self.expert_ids.index(expert)

    @torch.no_grad()
    def generate(self, z_NZ: torch.Tensor, expert: int) -> torch.Tensor:
        """Decode latents with one chosen expert: images in [0, 1], [N, D]."""
        idx = torch.tensor([self._local_index(expert)], device=z_NZ.device)
        z_1NZ = z_NZ[None].to(self.weight_dtype)
        return self.experts.decode(z_1NZ, experts=idx)[0].float().sigmoid()

    @torch.no_grad()
    def decode_all(self, z_NZ: torch.Tensor) -> torch.Tensor:
        """The same latents decoded by every expert of the bank (the seed's figure): [E_l, N, D]."""
        E = self.experts.num_experts
        z_ENZ = z_NZ.to(self.weight_dtype).expand(E, *z_NZ.shape).contiguous()
        return self.experts.decode(z_ENZ).float().sigmoid()

    @torch.no_grad()
    def sample(self, n: int, expert: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """N images from expert k, z ~ N(0, I)."""
        device = next(self.parameters()).device
        z_NZ = torch.randn(n, self.cfg.z_dim, generator=generator, device=device)
        return self.generate(z_NZ, expert)
