"""The stacked expert banks equal E independent VAEs with the same weights (outputs and grads)."""

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from moe_vae.config.schema import Config, LossConfig, ModelConfig, TrainConfig
from moe_vae.errors import MoeVaeError
from moe_vae.model.experts import ConvExpertBank, MLPExpertBank
from moe_vae.model.layers import StackedMLP, activation
from moe_vae.model.losses import gaussian_nll, kl_standard_normal, objective
from moe_vae.model.mixture import MixtureOfVAEs


def _linears(mlp: StackedMLP, e: int) -> list[nn.Linear]:
    """Expert e's layers of a StackedMLP as ordinary nn.Linear modules (copied weights)."""
    out = []
    for layer in mlp.layers:
        _, i, o = layer.weight_EIO.shape
        lin = nn.Linear(i, o)
        lin.weight.data = layer.weight_EIO.data[e].T.clone()
        lin.bias.data = layer.bias_EO.data[e].clone()
        out.append(lin)
    return out


def _run_mlp(layers: list[nn.Linear], h: torch.Tensor, act) -> torch.Tensor:
    for k, lin in enumerate(layers):
        if k:
            h = act(h)
        h = lin(h)
    return h


class RefMLPVAE(nn.Module):
    def __init__(self, bank: MLPExpertBank, e: int, act: str):
        super().__init__()
        self.enc = nn.ModuleList(_linears(bank.encoder, e))
        self.dec = nn.ModuleList(_linears(bank.decoder, e))
        self.act, self.floor = activation(act), bank.var_floor

    def forward(self, x, eps):
        mu, raw = _run_mlp(list(self.enc), x, self.act).chunk(2, -1)
        var = self.floor + raw.exp()
        z = mu + var.sqrt() * eps
        return mu, var, _run_mlp(list(self.dec), z, self.act)


class RefConvVAE(nn.Module):
    def __init__(self, bank: ConvExpertBank, e: int, act: str):
        super().__init__()
        self.act, self.floor, self.bank = activation(act), bank.var_floor, bank
        self.convs = nn.ModuleList()
        for conv in bank.enc_convs:
            ref = nn.Conv2d(conv.c_in, conv.c_out, 4, 2, 1)
            ref.weight.data = conv.weight.data[e * conv.c_out : (e + 1) * conv.c_out].clone()
            ref.bias.data = conv.bias.data[e * conv.c_out : (e + 1) * conv.c_out].clone()
            self.convs.append(ref)
        self.deconvs = nn.ModuleList()
        for k, conv in enumerate(bank.dec_convs):
            (h_in, w_in), (h_out, w_out) = bank.sizes[-1 - k], bank.sizes[-2 - k]
            pad = (h_out - 2 * h_in, w_out - 2 * w_in)
            ref = nn.ConvTranspose2d(conv.c_in, conv.c_out, 4, 2, 1, output_padding=pad)
            ref.weight.data = conv.weight.data[e * conv.c_in : (e + 1) * conv.c_in].clone()
            ref.bias.data = conv.bias.data[e * conv.c_out : (e + 1) * conv.c_out].clone()
            self.deconvs.append(ref)
        self.enc_mlp = nn.ModuleList(_linears(bank.enc_mlp, e))
        self.dec_mlp = nn.ModuleList(_linears(bank.dec_mlp, e))

    def forward(self, x, eps):
        C, H, W = self.bank.image_shape
        h = x.view(-1, C, H, W)
        for conv in self.convs:
            h = self.act(conv(h))
        mu, raw = _run_mlp(list(self.enc_mlp), h.flatten(1), self.act).chunk(2, -1)
        var = self.floor + raw.exp()
        z = mu + var.sqrt() * eps
        h = self.act(_run_mlp(list(self.dec_mlp), z, self.act))
        h = h.view(len(z), -1, *self.bank.sizes[-1])
        for k, deconv in enumerate(self.deconvs):
            h = deconv(h)
            if k < len(self.deconvs) - 1:
                h = self.act(h)
        return mu, var, h.flatten(1)


def _loss(x, mu, var, logits):
    return (gaussian_nll(x, logits, 0.5) + kl_standard_normal(mu, var)).sum()


CASES = [
    ("mlp", (1, 6, 5), dict(encoder_layers=[7, 5], decoder_layers=[6], activation="sigmoid")),
    ("mlp", (1, 4, 4), dict(encoder_layers=[], decoder_layers=[], activation="tanh")),
    (
        "conv",
        (1, 13, 11),
        dict(conv_channels=[3, 5], encoder_layers=[6], decoder_layers=[4], activation="relu"),
    ),
    (
        "conv",
        (2, 8, 8),
        dict(conv_channels=[4], encoder_layers=[], decoder_layers=[], activation="sigmoid"),
    ),
]


@pytest.mark.parametrize(("kind", "shape", "extra"), CASES)
def test_bank_equals_independent_vaes(kind, shape, extra):
    torch.manual_seed(0)
    E, B, Z = 3, 5, 2
    cfg = ModelConfig(num_experts=E, expert=kind, z_dim=Z, **extra)
    D = shape[0] * shape[1] * shape[2]
    bank = MLPExpertBank(cfg, D) if kind == "mlp" else ConvExpertBank(cfg, shape)
    refs = [(RefMLPVAE if kind == "mlp" else RefConvVAE)(bank, e, cfg.activation) for e in range(E)]
    x = torch.rand(B, D)

    out = bank(x, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(E, B, Z, generator=torch.Generator().manual_seed(7))
    _loss(x, out.mu_EBZ, out.var_EBZ, out.x_logits_EBD).backward()

    for e, ref in enumerate(refs):
        mu, var, logits = ref(x, eps[e])
        torch.testing.assert_close(out.mu_EBZ[e], mu)
        torch.testing.assert_close(out.var_EBZ[e], var)
        torch.testing.assert_close(out.x_logits_EBD[e], logits)
        _loss(x, mu[None], var[None], logits[None]).backward()

    # Gradients: every stacked parameter's slice for expert e equals the reference's gradient.
    for e, ref in enumerate(refs):
        mlps = (
            [(bank.encoder, ref.enc), (bank.decoder, ref.dec)]
            if kind == "mlp"
            else [(bank.enc_mlp, ref.enc_mlp), (bank.dec_mlp, ref.dec_mlp)]
        )
        for stacked, lins in mlps:
            for layer, lin in zip(stacked.layers, lins, strict=True):
                torch.testing.assert_close(layer.weight_EIO.grad[e], lin.weight.grad.T)
                torch.testing.assert_close(layer.bias_EO.grad[e], lin.bias.grad)
        if kind == "conv":
            for conv, rc in zip(bank.enc_convs, ref.convs, strict=True):
                blk = slice(e * conv.c_out, (e + 1) * conv.c_out)
                torch.testing.assert_close(conv.weight.grad[blk], rc.weight.grad)
                torch.testing.assert_close(conv.bias.grad[blk], rc.bias.grad)
            for conv, rc in zip(bank.dec_convs, ref.deconvs, strict=True):
                blk_in = slice(e * conv.c_in, (e + 1) * conv.c_in)
                blk_out = slice(e * conv.c_out, (e + 1) * conv.c_out)
                torch.testing.assert_close(conv.weight.grad[blk_in], rc.weight.grad)
                torch.testing.assert_close(conv.bias.grad[blk_out], rc.bias.grad)


@pytest.mark.parametrize(("kind", "shape", "extra"), CASES)
def test_per_expert_inputs_match_shared_input(kind, shape, extra):
    """[E, B, D] inputs (what a dispatcher sends) give the same result as one shared [B, D]."""
    torch.manual_seed(1)
    cfg = ModelConfig(num_experts=3, expert=kind, z_dim=2, **extra)
    D = shape[0] * shape[1] * shape[2]
    bank = MLPExpertBank(cfg, D) if kind == "mlp" else ConvExpertBank(cfg, shape)
    x = torch.rand(4, D)
    mu_a, var_a = bank.encode(x)
    mu_b, var_b = bank.encode(x.expand(3, 4, D).contiguous())
    torch.testing.assert_close(mu_a, mu_b)
    torch.testing.assert_close(var_a, var_b)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_generate_from_chosen_expert(kind):
    torch.manual_seed(2)
    cfg = ModelConfig(num_experts=4, expert=kind, z_dim=3, conv_channels=[2, 3])
    model = MixtureOfVAEs(cfg, (1, 28, 28))
    z = torch.randn(5, 3)
    every = model.decode_all(z)
    assert every.shape == (4, 5, 784)
    for k in range(4):
        torch.testing.assert_close(model.generate(z, k), every[k])
    assert ((every >= 0) & (every <= 1)).all()
    with pytest.raises(ValueError, match=r"expert index 4 out of range.*0\.\.3"):
        model.generate(z, 4)
    assert model.sample(6, expert=1).shape == (6, 784)


def test_assign_is_manager_argmax():
    torch.manual_seed(3)
    model = MixtureOfVAEs(ModelConfig(num_experts=5), (1, 4, 4))
    x = torch.rand(9, 16)
    out = model(x)
    torch.testing.assert_close(out.probs_BE.sum(-1), torch.ones(9))
    assert torch.equal(model.assign(x), out.probs_BE.argmax(-1))


def test_conv_rejects_too_many_layers_for_image():
    """Bad input, so the package's error (one line from the CLI), naming the key and the fit."""
    with pytest.raises(MoeVaeError, match=r"conv_channels=\[2, 2, 2\] has 3 .* 4x4 images.* 2 fit"):
        ConvExpertBank(ModelConfig(expert="conv", conv_channels=[2, 2, 2]), (1, 4, 4))
    ConvExpertBank(ModelConfig(expert="conv", conv_channels=[2, 2]), (1, 4, 4))  # 4 -> 2 -> 1


def test_model_package_never_imports_distribution():
    """Model code stays single-device: no torch.distributed or deepspeed imports."""
    model_dir = Path(__file__).resolve().parents[2] / "moe_vae" / "model"
    for path in model_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                assert not name.startswith(("torch.distributed", "deepspeed")), (path, name)


def test_bernoulli_objective_reaches_every_parameter():
    from moe_vae.model.losses import objective

    model = MixtureOfVAEs(
        ModelConfig(
            num_experts=2, z_dim=2, encoder_layers=[4], decoder_layers=[4], manager_layers=[4]
        ),
        (1, 3, 3),
    )
    x = torch.rand(6, 9)
    cfg = LossConfig(likelihood="bernoulli")
    terms = objective(model.losses(x, cfg), cfg)
    terms.total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def _fuse_state(plain: MixtureOfVAEs) -> dict[str, torch.Tensor]:
    """The unfused model's weights in the fused layout: the manager's and the encoders' first
    layers become the fused [D, M + E*H] weight; their later layers move down by one."""
    m_lin, e_lin = plain.manager.layers[0], plain.experts.encoder.layers[0]
    state = {
        "input_layer.weight_IF": torch.cat(
            [m_lin.weight.T, e_lin.weight_EIO.permute(1, 0, 2).flatten(1)], dim=1
        ),
        "input_layer.bias_F": torch.cat([m_lin.bias, e_lin.bias_EO.flatten()]),
    }
    for key, value in plain.state_dict().items():
        for prefix in ("manager.layers.", "experts.encoder.layers."):
            if key.startswith(prefix):
                index, rest = key[len(prefix) :].split(".", 1)
                if index != "0":
                    state[f"{prefix}{int(index) - 1}.{rest}"] = value
                break
        else:
            state[key] = value
    return state


@pytest.mark.parametrize("layers", [[6], [6, 5]])
def test_fused_input_layer_computes_the_unfused_model(layers):
    """model.fused_input: the manager's and the experts' first layers as one weight give the
    same losses, gradients and cluster assignments as the separate layers they replace."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        num_experts=3, z_dim=2, encoder_layers=layers, decoder_layers=[4], manager_layers=[7, 5]
    )
    plain = MixtureOfVAEs(cfg, (1, 3, 3))
    fused = MixtureOfVAEs(cfg.model_copy(update={"fused_input": True}), (1, 3, 3))
    fused.load_state_dict(_fuse_state(plain))  # strict: the layouts match key for key
    eps = torch.randn(3, 8, 2)
    for m in (plain, fused):
        m.noise = lambda e, n, z: eps[e, n]
    x, loss_cfg = torch.rand(8, 9), LossConfig()
    a = objective(plain.losses(x, loss_cfg), loss_cfg)
    b = objective(fused.losses(x, loss_cfg), loss_cfg)
    torch.testing.assert_close(b.total, a.total)
    torch.testing.assert_close(fused.manager_logits(x), plain.manager_logits(x))
    assert torch.equal(fused.assign(x), plain.assign(x))
    torch.testing.assert_close(fused(x).mu_EBZ, plain(x).mu_EBZ)
    a.total.backward()
    b.total.backward()
    grads = {n: p.grad for n, p in plain.named_parameters()}
    fused_grads = {n: p.grad for n, p in fused.named_parameters()}
    M, H = 7, layers[0]
    grad_IF = fused_grads["input_layer.weight_IF"]
    torch.testing.assert_close(grad_IF[:, :M], grads["manager.layers.0.weight"].T)
    torch.testing.assert_close(
        grad_IF[:, M:].view(9, 3, H).permute(1, 0, 2), grads["experts.encoder.layers.0.weight_EIO"]
    )
    torch.testing.assert_close(
        fused_grads["manager.layers.0.weight"], grads["manager.layers.1.weight"]
    )
    torch.testing.assert_close(
        fused_grads["experts.decoder.layers.1.weight_EIO"],
        grads["experts.decoder.layers.1.weight_EIO"],
    )


def test_fused_input_config_rules():
    with pytest.raises(ValueError, match=r"model\.fused_input needs model\.routing: dense"):
        ModelConfig(fused_input=True, routing="topk")
    with pytest.raises(ValueError, match=r"a hidden layer in model\.manager_layers"):
        ModelConfig(fused_input=True, manager_layers=[])
    with pytest.raises(ValueError, match=r"revive_dead_experts is not supported with model\.fused"):
        Config(model=ModelConfig(fused_input=True), train=TrainConfig(revive_dead_experts=True))
