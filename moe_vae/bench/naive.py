"""The naive port: what a first PyTorch translation of the founding recipe looks like.

E independent VAE modules and a manager, a Python loop over the experts in every forward pass,
eager mode, torch's default Adam, a standard DataLoader over a float tensor. The math is the
same as moe-vae's dense path (docs/model.md): per expert L_i = Gaussian or Bernoulli NLL + KL,
loss = expected expert loss (or mixture NLL) + balancing_weight * variance balancing.
It is the reference `moe-vae bench` measures our trainer against; it supports MLP experts only.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from moe_vae.bench.scope import unsupported
from moe_vae.config.schema import Config
from moe_vae.model.layers import activation


def _mlp(widths: list[int], act: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k, (i, o) in enumerate(pairwise(widths)):
        if k:
            layers.append(_Act(act))
        layers.append(nn.Linear(i, o))
    return nn.Sequential(*layers)


class _Act(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.fn = activation(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class NaiveVAE(nn.Module):
    def __init__(self, cfg: Config, input_dim: int) -> None:
        super().__init__()
        m = cfg.model
        self.z_dim, self.var_floor = m.z_dim, m.var_floor
        self.encoder = _mlp([input_dim, *m.encoder_layers, 2 * m.z_dim], m.activation)
        self.decoder = _mlp([m.z_dim, *m.decoder_layers, input_dim], m.activation)

    def loss(
        self, x: torch.Tensor, likelihood: str, decoder_std: float, eps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """L(x) per input: NLL + KL, one sample of z (eps ~ N(0, I) unless given). [B]"""
        mu, raw = self.encoder(x).chunk(2, dim=-1)
        var = self.var_floor + torch.exp(raw)
        z = mu + var.sqrt() * (torch.randn_like(mu) if eps is None else eps)
        logits = self.decoder(z)
        if likelihood == "gaussian":
            sq = ((x - torch.sigmoid(logits)) / decoder_std).pow(2).sum(-1)
            nll = 0.5 * sq + x.shape[-1] * (math.log(decoder_std) + 0.5 * math.log(2 * math.pi))
        else:
            nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        kl = 0.5 * (var + mu.pow(2) - 1.0 - var.log()).sum(-1)
        return nll + kl


class NaiveMixture(nn.Module):
    def __init__(self, cfg: Config, input_dim: int) -> None:
        super().__init__()
        m = cfg.model
        reason = unsupported(cfg)
        if reason:
            raise ValueError(reason)
        self.cfg = cfg
        self.vaes = [NaiveVAE(cfg, input_dim) for _ in range(m.num_experts)]
        for i, vae in enumerate(self.vaes):  # registered one by one, as a naive port would
            self.add_module(f"vae{i}", vae)
        self.manager = _mlp([input_dim, *m.manager_layers, m.num_experts], m.activation)

    def forward(self, x: torch.Tensor, eps_EBZ: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss of one batch (a scalar)."""
        loss_cfg = self.cfg.loss
        logits = self.manager(x)
        probs = logits.softmax(-1)
        losses = torch.stack(
            [
                vae.loss(
                    x,
                    loss_cfg.likelihood,
                    loss_cfg.decoder_std,
                    None if eps_EBZ is None else eps_EBZ[i],
                )
                for i, vae in enumerate(self.vaes)
            ],
            dim=1,
        )
        if loss_cfg.objective == "expected":
            main = (probs * losses).sum(-1).mean()
        else:
            main = -torch.logsumexp(logits.log_softmax(-1) - losses, dim=-1).mean()
        balancing = probs.sum(0).var(unbiased=False)
        return main + loss_cfg.balancing_weight * balancing
