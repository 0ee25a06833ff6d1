"""Expert banks: E VAEs whose weights are stacked so each layer of all experts is one kernel.

Legend: E experts, B batch, D flattened input (C*H*W), Z latent, F flattened conv features.
Inputs are flattened images in [0, 1]; decoders return logits (sigmoid gives the mean image).
An input is either [B, D], shared by every expert (dense routing), or [E, B, D], one batch per
expert (what a dispatcher hands over), or [R, D] rows grouped by expert with `groups` (top-k
with grouped GEMM, MLP experts: model/grouped.py); outputs then have R in place of E, B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from moe_vae.config.schema import ModelConfig
from moe_vae.errors import MoeVaeError
from moe_vae.model.grouped import Groups
from moe_vae.model.layers import StackedMLP, activation


@dataclass
class ExpertOutput:
    mu_EBZ: torch.Tensor
    var_EBZ: torch.Tensor
    z_EBZ: torch.Tensor
    x_logits_EBD: torch.Tensor


class ExpertBank(nn.Module):
    """Interface shared by every expert type: encode, reparameterise, decode."""

    num_experts: int
    z_dim: int
    var_floor: float

    def encode(
        self, x: torch.Tensor, groups: Groups | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, D] or [E, B, D] -> (mu_EBZ, var_EBZ), var = floor + exp(linear(h))."""
        raise NotImplementedError

    def decode(
        self,
        z_EBZ: torch.Tensor,
        experts: torch.Tensor | None = None,
        groups: Groups | None = None,
    ) -> torch.Tensor:
        """z: [E, B, Z] (or [len(experts), B, Z]) -> logits [E, B, D]."""
        raise NotImplementedError

    def _split_heads(self, h_EB2Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu_EBZ, raw_EBZ = h_EB2Z.chunk(2, dim=-1)
        return mu_EBZ, self.var_floor + torch.exp(raw_EBZ)

    def forward(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        eps_EBZ: torch.Tensor | None = None,
        groups: Groups | None = None,
    ) -> ExpertOutput:
        """Encode, sample z = mu + sqrt(var) * eps (eps ~ N(0, I) unless given), decode."""
        mu_EBZ, var_EBZ = self.encode(x, groups)
        if eps_EBZ is None:
            eps_EBZ = torch.randn(
                mu_EBZ.shape, generator=generator, device=mu_EBZ.device, dtype=mu_EBZ.dtype
            )
        z_EBZ = mu_EBZ + var_EBZ.sqrt() * eps_EBZ.to(mu_EBZ.dtype)  # fixed noise is fp32
        return ExpertOutput(mu_EBZ, var_EBZ, z_EBZ, self.decode(z_EBZ, groups=groups))


class MLPExpertBank(ExpertBank):
    """Fully connected VAEs: D -> encoder_layers -> (mu, var); Z -> decoder_layers -> D.
    With model.fused_input the encoder's first layer lives in the model's FusedInputLayer:
    encode() then takes its activated output [E, B, encoder_layers[0]], not the input."""

    def __init__(self, cfg: ModelConfig, input_dim: int, num_experts: int | None = None) -> None:
        super().__init__()
        E, Z = num_experts or cfg.num_experts, cfg.z_dim
        self.num_experts, self.z_dim, self.var_floor = E, Z, cfg.var_floor
        widths = [input_dim, *cfg.encoder_layers, 2 * Z]
        self.encoder = StackedMLP(E, widths[1:] if cfg.fused_input else widths, cfg.activation)
        self.decoder = StackedMLP(E, [Z, *cfg.decoder_layers, input_dim], cfg.activation)

    def encode(
        self, x: torch.Tensor, groups: Groups | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._split_heads(self.encoder(x, groups=groups))

    def decode(
        self,
        z_EBZ: torch.Tensor,
        experts: torch.Tensor | None = None,
        groups: Groups | None = None,
    ) -> torch.Tensor:
        return self.decoder(z_EBZ, experts, groups)


class _GroupedConv(nn.Module):
    """E convolutions (or transposed convolutions) as one grouped conv over [B, E*C, H, W]."""

    KERNEL, STRIDE, PAD = 4, 2, 1  # halves the size: floor(H / 2); the transpose doubles it

    def __init__(self, num_experts: int, c_in: int, c_out: int, transposed: bool) -> None:
        super().__init__()
        self.num_experts, self.c_in, self.c_out, self.transposed = (
            num_experts,
            c_in,
            c_out,
            transposed,
        )
        k = self.KERNEL
        shape = (
            (num_experts * c_in, c_out, k, k) if transposed else (num_experts * c_out, c_in, k, k)
        )
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(num_experts * c_out))
        bound = 1.0 / math.sqrt(c_in * k * k)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(
        self,
        h: torch.Tensor,
        shared_input: bool = False,
        out_hw: tuple[int, int] | None = None,
        experts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """h: [B, G*c_in, H, W] with G = E (or len(experts)); a shared input has c_in channels."""
        E = self.num_experts
        weight: torch.Tensor = self.weight
        bias: torch.Tensor = self.bias
        groups = E
        if experts is not None:  # keep only the chosen experts' filter blocks
            weight = weight.view(E, -1, *weight.shape[1:])[experts].flatten(0, 1)
            bias = bias.view(E, -1)[experts].flatten()
            groups = len(experts)
        if self.transposed:
            assert out_hw is not None
            H, W = h.shape[-2:]
            pad = (out_hw[0] - 2 * H, out_hw[1] - 2 * W)  # 0 or 1: recovers odd sizes exactly
            return F.conv_transpose2d(h, weight, bias, self.STRIDE, self.PAD, pad, groups=groups)
        # A shared input has c_in channels, not E*c_in: one ordinary conv makes all experts' maps.
        if shared_input:
            groups = 1
        return F.conv2d(h, weight, bias, self.STRIDE, self.PAD, groups=groups)


class ConvExpertBank(ExpertBank):
    """Convolutional VAEs for images (28x28 and larger).

    Encoder: stride-2 4x4 convs with `conv_channels`, flatten, `encoder_layers`, (mu, var).
    Decoder mirrors it: `decoder_layers`, unflatten, stride-2 transposed convs back to [C, H, W].
    All experts run as grouped convolutions (groups = E), so no loop over experts.
    """

    def __init__(
        self, cfg: ModelConfig, image_shape: tuple[int, int, int], num_experts: int | None = None
    ) -> None:
        super().__init__()
        E, Z = num_experts or cfg.num_experts, cfg.z_dim
        self.num_experts, self.z_dim, self.var_floor = E, Z, cfg.var_floor
        C, H, W = image_shape
        self.image_shape = image_shape
        channels = [C, *cfg.conv_channels]
        self.sizes = [(H, W)]
        for _ in cfg.conv_channels:
            h, w = self.sizes[-1]
            if h < 2 or w < 2:
                # Bad input, not a bug: the image size is known only once the data is read, so
                # the config's own validation cannot catch this.
                fits = len(self.sizes) - 1
                raise MoeVaeError(
                    f"model.conv_channels={cfg.conv_channels} has {len(cfg.conv_channels)} "
                    f"stride-2 layers, too many for {H}x{W} images: each halves the size, so at "
                    f"most {fits} fit"
                )
            self.sizes.append((h // 2, w // 2))
        h, w = self.sizes[-1]
        self.flat_features = channels[-1] * h * w
        self.act = activation(cfg.activation)
        self.enc_convs = nn.ModuleList(
            _GroupedConv(E, i, o, transposed=False) for i, o in pairwise(channels)
        )
        self.enc_mlp = StackedMLP(
            E, [self.flat_features, *cfg.encoder_layers, 2 * Z], cfg.activation
        )
        self.dec_mlp = StackedMLP(E, [Z, *cfg.decoder_layers, self.flat_features], cfg.activation)
        rev = channels[::-1]
        self.dec_convs = nn.ModuleList(
            _GroupedConv(E, i, o, transposed=True) for i, o in pairwise(rev)
        )

    def encode(
        self, x: torch.Tensor, groups: Groups | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert groups is None, "grouped GEMM is for MLP experts (config-checked)"
        E, (C, H, W) = self.num_experts, self.image_shape
        shared = x.dim() == 2
        if shared:
            h = x.view(-1, C, H, W)
        else:  # [E, B, D] -> [B, E*C, H, W]: expert e owns channel block e
            h = x.view(E, -1, C, H, W).transpose(0, 1).reshape(-1, E * C, H, W)
        for k, conv in enumerate(self.enc_convs):
            h = self.act(conv(h, shared_input=shared and k == 0))
        B = h.shape[0]
        h_EBF = h.view(B, E, self.flat_features).transpose(0, 1)
        return self._split_heads(self.enc_mlp(h_EBF))

    def decode(
        self,
        z_EBZ: torch.Tensor,
        experts: torch.Tensor | None = None,
        groups: Groups | None = None,
    ) -> torch.Tensor:
        assert groups is None, "grouped GEMM is for MLP experts (config-checked)"
        C, H, W = self.image_shape
        G = self.num_experts if experts is None else len(experts)
        h_GBF = self.act(self.dec_mlp(z_EBZ, experts))
        B = h_GBF.shape[1]
        # [G, B, F] -> [B, G*c_L, h, w]: expert g owns channel block g
        h = h_GBF.transpose(0, 1).reshape(B, -1, *self.sizes[-1])
        for k, deconv in enumerate(self.dec_convs):
            h = deconv(h, out_hw=self.sizes[-2 - k], experts=experts)
            if k < len(self.dec_convs) - 1:
                h = self.act(h)
        return h.view(B, G, C * H * W).transpose(0, 1)  # [B, G*C, H, W] -> [G, B, D]


def build_expert_bank(
    cfg: ModelConfig, image_shape: tuple[int, int, int], num_experts: int | None = None
) -> ExpertBank:
    """A bank of `num_experts` (default: all of cfg.num_experts) experts of cfg's type."""
    if cfg.expert == "mlp":
        return MLPExpertBank(cfg, math.prod(image_shape), num_experts)
    return ConvExpertBank(cfg, image_shape, num_experts)
