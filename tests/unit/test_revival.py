"""Manager collapse is detected from usage; revival turns dead experts into copies of busy ones."""

from __future__ import annotations

import math

import torch

from moe_vae.config import load_config
from moe_vae.model.losses import objective
from moe_vae.model.mixture import MixtureOfVAEs
from moe_vae.parallel.dist import DistInfo
from moe_vae.parallel.setup import Parallel
from moe_vae.train.revival import collapse_message, pick_pairs, revive


def test_collapse_is_reported_only_past_the_share():
    assert collapse_message([0.5, 0.3, 0.2], 0.5) is None
    msg = collapse_message([0.05, 0.9, 0.05], 0.5)
    assert msg is not None and "expert 1" in msg and "90%" in msg
    assert collapse_message([1.0], 0.5) is None  # one expert cannot collapse


def test_dead_experts_are_paired_with_the_busiest():
    assert pick_pairs([0.6, 0.0, 0.3, 0.001, 0.099], 0.01) == [(1, 0), (3, 2)]
    assert pick_pairs([0.5, 0.5], 0.01) == []
    assert pick_pairs([0.0, 0.0], 0.01) == []  # nobody to copy
    # eval.in_use_min_fraction=0: an expert given nothing is still dead (it was kept as is)
    assert pick_pairs([0.7, 0.0, 0.3], 0.0) == [(1, 0)]


def test_revive_copies_the_donor_and_splits_its_probability():
    """Weights (perturbed) and Adam's moments of the donor go to the dead expert; the manager
    gives the pair the donor's old share, split in two."""
    cfg = load_config(None, ["--model.num_experts=4", "--model.z_dim=3"])
    torch.manual_seed(0)
    model = MixtureOfVAEs(cfg.model, (1, 4, 4))
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(32, 16)
    objective(model.losses(x, cfg.loss), cfg.loss).total.backward()
    optim.step()
    before = model.manager(x).softmax(-1).detach()
    untouched = {k: v.clone() for k, v in model.state_dict().items()}
    par = Parallel(DistInfo(0, 1, 0, torch.device("cpu")))

    revive(model, optim, par, [(2, 0)], noise=0.01, seed=1)

    after = model.manager(x).softmax(-1).detach()
    torch.testing.assert_close(after[:, 2], after[:, 0])
    # The pair shares the donor's old weight against every other expert (the dead one's is gone).
    torch.testing.assert_close(
        (after[:, 0] + after[:, 2]) / after[:, 1], before[:, 0] / before[:, 1]
    )
    torch.testing.assert_close(after[:, 3] / after[:, 1], before[:, 3] / before[:, 1])
    for name, p in model.named_parameters():
        if not name.startswith("experts."):
            continue
        rows, old = p.detach().view(4, -1), untouched[name].view(4, -1)
        assert torch.equal(rows[[0, 1, 3]], old[[0, 1, 3]]), name  # only the dead one changes
        gap = (rows[2] - rows[0]).abs().max().item()
        assert 0 < gap <= 0.01 * 6 * old[0].abs().mean().item() + 1e-9, name  # a perturbed copy
        for key in ("exp_avg", "exp_avg_sq"):  # Adam's moments are the donor's
            moment = optim.state[p][key].view(4, -1)
            assert torch.equal(moment[2], moment[0]) and moment[0].abs().sum() > 0, name
    last = model.manager.layers[-1]
    for param in (last.weight, last.bias):
        moment = optim.state[param]["exp_avg_sq"]
        assert torch.equal(moment[2], moment[0]) and not torch.equal(moment[1], moment[0])
    assert math.isfinite(model.losses(x, cfg.loss).loss_BE.sum().item())
