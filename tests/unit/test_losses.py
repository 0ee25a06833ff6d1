"""Loss terms against hand computation and torch.distributions on small tensors."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from moe_vae.config.schema import LossConfig
from moe_vae.model.losses import (
    bernoulli_nll,
    choice_balancing,
    expected_expert_loss,
    fill_unrouted,
    gaussian_nll,
    kl_standard_normal,
    mixture_nll,
    objective,
    routed_logits,
    variance_balancing,
)
from moe_vae.model.mixture import Routed


def test_gaussian_nll_by_hand():
    x = torch.tensor([[0.2, 0.9]])
    logits = torch.tensor([[[0.0, 1.0]]])  # E=1, B=1, D=2
    std = 0.5
    mean = [0.5, 1 / (1 + math.exp(-1.0))]
    hand = sum(
        (xi - m) ** 2 / (2 * std**2) + math.log(std) + 0.5 * math.log(2 * math.pi)
        for xi, m in zip([0.2, 0.9], mean, strict=True)
    )
    got = gaussian_nll(x, logits, std)
    assert got.shape == (1, 1)
    assert got.item() == pytest.approx(hand, rel=1e-6)
    ref = -Normal(torch.sigmoid(logits), std).log_prob(x).sum(-1)
    torch.testing.assert_close(got, ref)


def test_bernoulli_nll_by_hand():
    x = torch.tensor([[0.0, 1.0, 0.3]])
    logits = torch.tensor([[[0.5, -1.0, 2.0]], [[0.0, 0.0, 0.0]]])  # E=2
    got = bernoulli_nll(x, logits)
    assert got.shape == (2, 1)
    for e in range(2):
        p = torch.sigmoid(logits[e, 0]).tolist()
        hand = -sum(
            xi * math.log(pi) + (1 - xi) * math.log(1 - pi)
            for xi, pi in zip([0.0, 1.0, 0.3], p, strict=True)
        )
        assert got[e, 0].item() == pytest.approx(hand, rel=1e-6)


def test_kl_against_closed_form_and_torch():
    mu = torch.tensor([[[0.0, 1.0]], [[-2.0, 0.5]]])
    var = torch.tensor([[[1.0, 0.25]], [[4.0, 1.0]]])
    got = kl_standard_normal(mu, var)
    # KL(N(0,1)||N(0,1)) = 0; KL(N(1,0.25)||N(0,1)) = 0.5 (0.25 + 1 - 1 - ln 0.25)
    assert got[0, 0].item() == pytest.approx(0.5 * (0.25 + 1 - 1 - math.log(0.25)), rel=1e-6)
    ref = kl_divergence(Normal(mu, var.sqrt()), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(got, ref)


def test_expected_expert_loss_by_hand():
    probs = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    loss = torch.tensor([[4.0, 8.0], [2.0, 10.0]])
    # sample 0: 0.25*4 + 0.75*8 = 7; sample 1: 2; mean 4.5
    assert expected_expert_loss(probs, loss).item() == pytest.approx(4.5)


def test_variance_balancing_on_hand_made_probabilities():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.2, 0.8]])
    # importance = [1.7, 1.3], mean 1.5, population variance ((0.2)^2 + (0.2)^2) / 2 = 0.04
    assert variance_balancing(probs).item() == pytest.approx(0.04, rel=1e-5)
    uniform = torch.full((6, 3), 1 / 3)
    assert variance_balancing(uniform).item() == pytest.approx(0.0, abs=1e-7)
    collapsed = torch.tensor([[1.0, 0.0]] * 4)  # importance [4, 0]: variance 4
    assert variance_balancing(collapsed).item() == pytest.approx(4.0)


def test_mixture_nll_by_hand_and_stable():
    logits = torch.log(torch.tensor([[0.5, 0.5]]))
    loss = torch.tensor([[1.0, 3.0]])
    hand = -math.log(0.5 * math.exp(-1) + 0.5 * math.exp(-3))
    assert mixture_nll(logits, loss).item() == pytest.approx(hand, rel=1e-6)
    huge = torch.tensor([[1e4, 2e4]])  # exp(-1e4) underflows; log space must not
    val = mixture_nll(logits, huge)
    assert torch.isfinite(val)
    assert val.item() == pytest.approx(1e4 + math.log(2), rel=1e-6)


@pytest.mark.parametrize("objective_name", ["expected", "mixture"])
def test_objective_total_combines_terms(objective_name):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, generator=g, requires_grad=True)
    loss = torch.rand(3, 2, generator=g) * 10
    cfg = LossConfig(objective=objective_name, balancing_weight=0.3)
    terms = objective(Routed(logits, loss), cfg)
    main = terms.expected if objective_name == "expected" else terms.mixture
    torch.testing.assert_close(terms.total, main + 0.3 * terms.balancing)
    torch.testing.assert_close(terms.balancing, variance_balancing(logits.softmax(-1)))
    # mixture likelihood is a lower loss than the expectation (Jensen): -log E[e^-L] <= E[L]
    assert terms.mixture.item() <= terms.expected.item() + 1e-5
    terms.total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_balancing_sums_importance_over_ranks():
    """Two halves of a batch with the importance summed across them == the whole batch."""
    probs = torch.rand(6, 4).softmax(-1)
    halves = [probs[:3], probs[3:]]
    other = [h.sum(0) for h in halves]
    for r, half in enumerate(halves):
        summed = variance_balancing(half, lambda imp, r=r: imp + other[1 - r])
        torch.testing.assert_close(summed, variance_balancing(probs))


def test_choice_balancing_by_hand():
    uniform = torch.full((4, 4), 0.25)
    spread = torch.eye(4, dtype=torch.bool)  # each expert chosen once
    assert choice_balancing(uniform, spread).item() == pytest.approx(1.0)
    # Probabilities and choices both on expert 0: E * (1 * 1) = 4, the maximum.
    peaked = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(4, 1)
    crowded = torch.zeros(4, 4, dtype=torch.bool)
    crowded[:, 0] = True
    assert choice_balancing(peaked, crowded).item() == pytest.approx(4.0)
    # Dense routing: the choices are the argmax.
    assert choice_balancing(peaked).item() == pytest.approx(4.0)


def test_choice_balancing_lowers_the_crowded_expert_even_when_probabilities_are_flat():
    """Flat probabilities, every input choosing expert 0 (what top-1 over many experts falls
    into): the variance of importance is 0 and gives no gradient; this term lowers expert 0's
    logit and raises the others'."""
    logits = torch.zeros(8, 4, requires_grad=True)
    crowded = torch.zeros(8, 4, dtype=torch.bool)
    crowded[:, 0] = True
    probs = logits.softmax(-1)
    assert variance_balancing(probs).item() == 0.0
    (grad,) = torch.autograd.grad(choice_balancing(probs, crowded), logits)
    assert (grad[:, 0] > 0).all() and (grad[:, 1:] < 0).all()  # descent: expert 0 down


def test_objective_adds_choice_balancing_with_its_weight():
    logits = torch.randn(6, 5)
    loss = torch.rand(6, 5) * 100
    chosen = torch.zeros(6, 5, dtype=torch.bool).scatter(1, logits.topk(2, -1).indices, True)
    routed = Routed(logits, loss, mask_BE=chosen, chosen_BE=chosen)
    base = objective(routed, LossConfig()).total
    weighted = objective(routed, LossConfig(choice_balancing_weight=0.5)).total
    expected = 0.5 * choice_balancing(logits.softmax(-1), chosen)
    assert (weighted - base).item() == pytest.approx(expected.item(), rel=1e-5)


def _top1_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4 inputs over 3 experts, top-1: inputs 0, 1 chose expert 0, inputs 2, 3 expert 1; the
    pair (3, 1) was dropped over capacity. Computed losses 2, 4, 6: their mean is 4."""
    chosen = torch.zeros(4, 3, dtype=torch.bool)
    chosen[[0, 1, 2, 3], [0, 0, 1, 1]] = True
    mask = chosen.clone()
    mask[3, 1] = False
    loss = torch.zeros(4, 3)
    loss[[0, 1, 2], [0, 0, 1]] = torch.tensor([2.0, 4.0, 6.0])
    return loss, mask, chosen


def test_topk_uncomputed_pairs_count_at_the_batch_mean():
    loss, mask, _ = _top1_batch()
    loss.requires_grad_(True)
    filled = fill_unrouted(loss, mask)
    torch.testing.assert_close(filled, torch.where(mask, loss, 4.0))
    (grad,) = torch.autograd.grad(filled.sum(), loss)
    assert (grad == mask.float()).all()  # the mean is a constant: no gradient through it


def test_topk_expected_objective_moves_the_chosen_expert_by_its_loss_against_the_mean():
    """Uncomputed pairs at 0 made the expected loss lower every chosen expert's probability.
    At the batch mean: raised where the input fits better than the mean (input 0: 2 < 4),
    lowered where worse (input 2: 6 > 4), and a dropped pair gives nothing (input 3)."""
    loss, mask, chosen = _top1_batch()
    logits = torch.zeros(4, 3, requires_grad=True)
    terms = objective(Routed(logits, loss, mask, chosen_BE=chosen), LossConfig(balancing_weight=0))
    # Probabilities 1/3: rows (2+4+4)/3, 4, (6+4+4)/3, 4; their mean is 4.
    assert terms.expected.item() == pytest.approx(4.0)
    (grad,) = torch.autograd.grad(terms.total, logits)
    assert grad[0, 0] < 0 and grad[2, 1] > 0  # descent: input 0's expert up, input 2's down
    assert grad[3].abs().max() < 1e-7


def test_topk_overflow_does_not_lower_the_loss():
    """Every computed pair at 5: the objective is 5 however many pairs were dropped."""
    _, _, chosen = _top1_batch()
    logits = torch.randn(4, 3)
    for dropped in range(4):  # drop the first `dropped` inputs' pairs
        mask = chosen.clone()
        mask[:dropped] = False
        loss = torch.where(mask, 5.0, 0.0)
        terms = objective(Routed(logits, loss, mask, chosen_BE=chosen), LossConfig())
        assert terms.expected.item() == pytest.approx(5.0)
        assert terms.mixture.item() == pytest.approx(5.0)


def test_topk_fill_uses_the_mean_over_ranks():
    """Two halves of a batch with the computed losses summed across them == the whole batch."""
    loss, mask, _ = _top1_batch()
    whole = fill_unrouted(loss, mask)
    halves = [(loss[:2], mask[:2]), (loss[2:], mask[2:])]
    stats = [torch.stack([(ls * m).sum(), m.sum()]) for ls, m in halves]
    for r, (ls, m) in enumerate(halves):
        got = fill_unrouted(ls, m, lambda s, r=r: s + stats[1 - r])
        torch.testing.assert_close(got, whole[2 * r : 2 * r + 2])


def test_routed_logits_renormalise_over_the_computed_pairs():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    mask = torch.tensor([[True, False, True]])
    probs = routed_logits(logits, mask).softmax(-1)
    torch.testing.assert_close(probs, torch.tensor([[0.5 / 0.7, 0.0, 0.2 / 0.7]]))
    assert routed_logits(logits, None) is logits
