"""MixtureOfVAEs: the manager routes each input over the expert bank.

Legend: B batch, D flattened input, E experts, Z latent, N generated samples.
Routing here is dense (every expert sees every input), on one device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from moe_vae.config.schema import ModelConfig
from moe_vae.model.experts import build_expert_bank
from moe_vae.model.manager import Manager


@dataclass
class MixtureOutput:
    logits_BE: torch.Tensor  # manager logits
    probs_BE: torch.Tensor  # softmax(logits_BE)
    mu_EBZ: torch.Tensor
    var_EBZ: torch.Tensor
    z_EBZ: torch.Tensor
    x_logits_EBD: torch.Tensor  # decoder logits; sigmoid gives the reconstruction


class MixtureOfVAEs(nn.Module):
    def __init__(self, cfg: ModelConfig, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_shape = image_shape
        self.input_dim = math.prod(image_shape)
        self.num_experts = cfg.num_experts
        self.manager = Manager(self.input_dim, cfg.manager_layers, cfg.num_experts, cfg.activation)
        self.experts = build_expert_bank(cfg, self.image_shape)

    def forward(
        self, x_BD: torch.Tensor, generator: torch.Generator | None = None
    ) -> MixtureOutput:
        logits_BE = self.manager(x_BD)
        out = self.experts(x_BD, generator=generator)
        return MixtureOutput(
            logits_BE, logits_BE.softmax(-1), out.mu_EBZ, out.var_EBZ, out.z_EBZ, out.x_logits_EBD
        )

    @torch.no_grad()
    def assign(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Cluster id of each input: the manager's argmax, [B]."""
        return self.manager(x_BD).argmax(-1)

    def _check_expert(self, expert: int) -> None:
        if not 0 <= expert < self.num_experts:
            raise ValueError(
                f"expert index {expert} out of range: "
                f"this model has experts 0..{self.num_experts - 1}"
            )

    @torch.no_grad()
    def generate(self, z_NZ: torch.Tensor, expert: int) -> torch.Tensor:
        """Decode latents with one chosen expert: images in [0, 1], [N, D]."""
        self._check_expert(expert)
        idx = torch.tensor([expert], device=z_NZ.device)
        return self.experts.decode(z_NZ[None], experts=idx)[0].sigmoid()

    @torch.no_grad()
    def decode_all(self, z_NZ: torch.Tensor) -> torch.Tensor:
        """The same latents decoded by every expert (the seed's figure): [E, N, D] in [0, 1]."""
        z_ENZ = z_NZ.expand(self.num_experts, *z_NZ.shape).contiguous()
        return self.experts.decode(z_ENZ).sigmoid()

    @torch.no_grad()
    def sample(self, n: int, expert: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """N images from expert k, z ~ N(0, I)."""
        device = next(self.parameters()).device
        z_NZ = torch.randn(n, self.cfg.z_dim, generator=generator, device=device)
        return self.generate(z_NZ, expert)
