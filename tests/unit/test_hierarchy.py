"""The hierarchical manager, per-level balancing and the top-level clusters."""

from __future__ import annotations

import pytest
import torch

from moe_vae.config.schema import Config, ModelConfig
from moe_vae.model.losses import variance_balancing
from moe_vae.model.manager import HierarchicalManager, cluster_log_probs
from moe_vae.model.mixture import MixtureOfVAEs


def test_leaf_probabilities_are_products_of_the_levels():
    torch.manual_seed(0)
    manager = HierarchicalManager(12, [8], [2, 3, 2], "relu")
    x = torch.rand(5, 12)
    logp = manager(x)
    assert logp.shape == (5, 12)
    assert torch.allclose(logp.logsumexp(-1), torch.zeros(5), atol=1e-5)
    top = manager.top(x).softmax(-1)  # [B, 2]
    mid = manager.sub[0](x).softmax(-1)  # [2, B, 3]
    low = manager.sub[1](x).softmax(-1)  # [6, B, 2]
    # leaf (1, 2, 0): node 1*3+2 = 5 of level 2, leaf 5*2+0 = 10
    expected = top[:, 1] * mid[1, :, 2] * low[5, :, 0]
    assert torch.allclose(logp[:, 10].exp(), expected, atol=1e-6)
    clusters = cluster_log_probs(logp, [2, 3, 2]).exp()
    assert torch.allclose(clusters, top, atol=1e-5)


def test_flat_cluster_logits_are_the_managers():
    logits = torch.randn(4, 6)
    assert cluster_log_probs(logits, None) is logits


def test_balancing_per_level():
    probs = torch.tensor([[0.5, 0.1, 0.1, 0.3], [0.2, 0.2, 0.4, 0.2]])
    imp = probs.sum(0)  # leaves' importance: [0.7, 0.3, 0.5, 0.5]
    flat = variance_balancing(probs)
    assert torch.allclose(flat, imp.var(unbiased=False))
    assert torch.allclose(variance_balancing(probs, levels=[4]), flat)
    # [2, 2]: siblings (0.7, 0.3) and (0.5, 0.5), then the parents (1.0, 1.0)
    per_level = variance_balancing(probs, levels=[2, 2])
    expected = (torch.tensor([0.7, 0.3]).var(unbiased=False) + 0.0) / 2 + 0.0
    assert torch.allclose(per_level, expected)


def test_hierarchy_sets_the_leaves_and_is_checked():
    assert ModelConfig.model_validate({"hierarchy": [10, 3]}).num_experts == 30
    assert ModelConfig.model_validate({"hierarchy": [10, 3]}).num_clusters == 10
    with pytest.raises(ValueError, match="number of leaves"):
        ModelConfig.model_validate({"hierarchy": [10, 3], "num_experts": 10})
    with pytest.raises(ValueError, match="at least two levels"):
        ModelConfig.model_validate({"hierarchy": [10]})
    with pytest.raises(ValueError, match="routing: dense"):
        ModelConfig.model_validate({"hierarchy": [2, 2], "routing": "topk"})
    with pytest.raises(ValueError, match="revive_dead_experts"):
        Config.model_validate(
            {"model": {"hierarchy": [2, 2]}, "train": {"revive_dead_experts": True}}
        )


def test_mixture_assigns_top_level_experts():
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate(
        {"hierarchy": [3, 2], "z_dim": 2, "encoder_layers": [8], "decoder_layers": [8]}
    )
    model = MixtureOfVAEs(cfg, (1, 4, 4))
    x = torch.rand(20, 16)
    assert model.assign(x).max() < 3
    probs = model.manager(x).softmax(-1).reshape(20, 3, 2).sum(-1)
    assert torch.equal(model.assign(x), probs.argmax(-1))
    assert model.decode_all(torch.zeros(1, 2)).shape == (6, 1, 16)  # every leaf decodes
