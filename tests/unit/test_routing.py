"""Top-k routing on one device: slot planning, capacity drops, and k = E equals dense."""

import pytest
import torch

from moe_vae.config.schema import LossConfig, ModelConfig
from moe_vae.model.dispatch import pack, plan_slots, unpack
from moe_vae.model.losses import objective
from moe_vae.model.mixture import MixtureOfVAEs

SMALL = dict(z_dim=2, encoder_layers=[5], decoder_layers=[5], manager_layers=[6])


def test_slots_are_first_come_first_served():
    idx = torch.tensor([[2, 0], [2, 1], [0, 2]])  # B=3, K=2, E=3
    slot, counts = plan_slots(idx, 3)
    assert slot.tolist() == [0, 0, 1, 0, 1, 2]
    assert counts.tolist() == [2, 1, 3]
    x = torch.arange(3.0)[:, None] * torch.ones(1, 4)
    x_ECD, ids_EC, kept = pack(x, idx, slot, cap=2, num_experts=3, id_offset=10)
    assert kept.tolist() == [True, True, True, True, True, False]  # expert 2's third input
    assert x_ECD[2, :, 0].tolist() == [0.0, 1.0] and ids_EC[2].tolist() == [10, 11]
    loss_EC = torch.arange(6.0).view(3, 2)
    assert unpack(loss_EC, idx, slot, kept).tolist() == [[4.0, 0.0], [5.0, 2.0], [1.0, 0.0]]


@pytest.mark.parametrize("expert", ["mlp", "conv"])
def test_topk_with_all_experts_equals_dense(expert):
    torch.manual_seed(0)
    dense_cfg = ModelConfig(num_experts=4, expert=expert, conv_channels=[2], **SMALL)
    topk_cfg = dense_cfg.model_copy(update={"routing": "topk", "top_k": 4, "capacity_factor": 0.0})
    dense = MixtureOfVAEs(dense_cfg, (1, 6, 6))
    topk = MixtureOfVAEs(topk_cfg, (1, 6, 6))
    topk.load_state_dict(dense.state_dict())
    eps = torch.randn(4, 10, 2)
    for m in (dense, topk):
        m.noise = lambda e, n, z: eps[e, n]
    x = torch.rand(10, 36)
    cfg = LossConfig()
    a, b = objective(dense.losses(x, cfg), cfg), objective(topk.losses(x, cfg), cfg)
    torch.testing.assert_close(a.total, b.total)
    a.total.backward()
    b.total.backward()
    for (name, p), q in zip(dense.named_parameters(), topk.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_capacity_drops_are_counted_and_excluded():
    torch.manual_seed(1)
    cfg = ModelConfig(num_experts=4, routing="topk", top_k=1, capacity_factor=0.5, **SMALL)
    model = MixtureOfVAEs(cfg, (1, 3, 3))
    with torch.no_grad():  # a manager that sends every input to expert 0
        model.manager.layers[-1].bias.copy_(torch.tensor([50.0, 0, 0, 0]))
    x = torch.rand(16, 9)
    routed = model.losses(x, LossConfig())
    cap = 2  # 0.5 * 16 * 1 / 4
    assert routed.dropped.item() == 16 - cap
    assert routed.mask_BE.sum().item() == cap and routed.mask_BE[:, 1:].sum() == 0
    assert (routed.loss_BE[~routed.mask_BE] == 0).all()
    terms = objective(routed, LossConfig())
    terms.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    dropless = cfg.model_copy(update={"capacity_factor": 0.0})
    model.cfg = dropless
    assert model.losses(x, LossConfig()).dropped.item() == 0


def test_topk_config_rejects_k_above_experts():
    from moe_vae.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"model\.top_k=5 is more than model\.num_experts=4"):
        load_config(None, ["--model.num_experts=4", "--model.routing=topk", "--model.top_k=5"])


def test_evaluation_and_scores_are_dropless():
    """Evaluation (test neg ELBO) and `moe-vae score` (anomaly scores) route top-k without a
    capacity: they renormalise over the computed pairs, and a dropped input has none."""
    from moe_vae.commands import per_input
    from moe_vae.config import load_config
    from moe_vae.config.schema import EvalConfig
    from moe_vae.evaluate.evaluator import evaluate

    torch.manual_seed(0)
    tight = ModelConfig(
        num_experts=4, z_dim=2, encoder_layers=[8], decoder_layers=[8], manager_layers=[8],
        routing="topk", top_k=1, capacity_factor=0.25,
    )  # fmt: skip
    model = MixtureOfVAEs(tight, (1, 3, 3))
    images = torch.randint(0, 256, (32, 1, 3, 3), dtype=torch.uint8)
    x = images.flatten(1).float() / 255
    assert model.losses(x, LossConfig()).dropped.item() > 0  # training would drop pairs
    dropless = MixtureOfVAEs(tight.model_copy(update={"capacity_factor": 0.0}), (1, 3, 3))
    dropless.load_state_dict(model.state_dict())
    batches = [(images, torch.full((32,), -1))]
    got = evaluate(model, batches, LossConfig(), EvalConfig(), seed=3)
    want = evaluate(dropless, batches, LossConfig(), EvalConfig(), seed=3)
    assert got["neg_elbo"] == want["neg_elbo"] > 1.0
    # Top-1: one routed expert, its probability renormalised to 1, so both forms are its L(x).
    assert got["neg_elbo_mixture"] == pytest.approx(got["neg_elbo"], rel=1e-5)
    cfg = load_config(None, ["--model.num_experts=4", "--eval.batch_size=16"])
    _, nll = per_input(model, cfg, images, seed=3)
    assert (nll > 1.0).all()  # no input scored 0 for having been dropped


def _flat_top1(route_noise: str, experts: int = 8) -> MixtureOfVAEs:
    """Top-1 with a manager whose output ignores the input: logits = its last bias."""
    cfg = ModelConfig(
        num_experts=experts, routing="topk", top_k=1, capacity_factor=0.0,
        route_noise=route_noise, **SMALL,
    )  # fmt: skip
    model = MixtureOfVAEs(cfg, (1, 3, 3))
    with torch.no_grad():
        model.manager.layers[-1].weight.zero_()
    return model


def test_gumbel_routing_samples_the_managers_probabilities():
    """Greedy top-1 sends every input to the argmax; Gumbel routing picks expert i with
    probability p_i, and evaluation (eval mode) stays greedy."""
    probs = torch.tensor([0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05])
    x = torch.rand(4000, 9)
    counts = {}
    for noise in ("none", "gumbel"):
        model = _flat_top1(noise)
        with torch.no_grad():
            model.manager.layers[-1].bias.copy_(probs.log())
        gen = torch.Generator().manual_seed(0)
        counts[noise] = model.losses(x, LossConfig(), generator=gen).chosen_BE.sum(0).float()
        model.eval()
        assert (model.losses(x, LossConfig()).chosen_BE[:, 0]).all()
    assert counts["none"][0] == len(x)
    torch.testing.assert_close(counts["gumbel"] / len(x), probs, atol=0.03, rtol=0)


def test_gumbel_routing_is_reproducible_with_a_generator():
    model = _flat_top1("gumbel")
    x = torch.rand(64, 9)
    a, b = (model.losses(x, LossConfig(), generator=torch.Generator().manual_seed(5)) for _ in "ab")
    assert torch.equal(a.chosen_BE, b.chosen_BE)
    assert a.chosen_BE.sum(0).count_nonzero() > 4  # spread over the experts, not one


def test_route_noise_needs_topk_routing():
    from moe_vae.config import ConfigError, load_config

    with pytest.raises(
        ConfigError, match=r"model\.route_noise=gumbel .* needs model\.routing: topk"
    ):
        load_config(None, ["--model.route_noise=gumbel"])


def test_scores_route_greedily_whatever_the_models_mode():
    """`moe-vae score` on a model left in training mode: its Gumbel routing must not sample."""
    from moe_vae.commands import per_input
    from moe_vae.config import load_config

    model = _flat_top1("gumbel")
    with torch.no_grad():
        model.manager.layers[-1].weight.normal_()  # input-dependent choices
    cfg = load_config(None, ["--model.num_experts=8", "--eval.batch_size=16"])
    images = torch.randint(0, 256, (32, 1, 3, 3), dtype=torch.uint8)
    model.train()
    probs_train, nll_train = per_input(model, cfg, images, seed=3)
    assert model.training  # restored
    model.eval()
    probs_eval, nll_eval = per_input(model, cfg, images, seed=3)
    assert (probs_train == probs_eval).all() and (nll_train == nll_eval).all()
