"""Clustering metrics on hand-made assignments."""

import numpy as np
import pytest

from moe_vae.evaluate.metrics import (
    cluster_accuracy,
    clustering_metrics,
    contingency,
    many_to_one_accuracy,
)


def test_permuted_clusters_score_perfectly():
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    clusters = np.array([2, 2, 0, 0, 1, 1, 1])  # a relabelling
    m = clustering_metrics(labels, clusters, 3, 0.0)
    assert m["accuracy"] == 1.0
    assert m["nmi"] == pytest.approx(1.0)
    assert m["ari"] == pytest.approx(1.0)


def test_hungarian_is_one_to_one_and_many_to_one_is_not():
    labels = np.array([0, 0, 0, 0, 1, 1])
    clusters = np.array([0, 0, 1, 1, 2, 2])  # class 0 split over two experts
    assert cluster_accuracy(labels, clusters, 3) == pytest.approx(4 / 6)
    assert many_to_one_accuracy(labels, clusters, 3) == 1.0
    # one expert for everything: Hungarian can match it to one class only
    assert cluster_accuracy(labels, np.zeros(6, dtype=int), 3) == pytest.approx(4 / 6)


def test_contingency_rows_are_experts():
    table = contingency(np.array([0, 1, 1]), np.array([2, 2, 0]), 3)
    assert table.tolist() == [[0, 1], [0, 0], [1, 1]]


def test_random_assignment_is_near_chance():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 5000)
    clusters = rng.integers(0, 10, 5000)
    m = clustering_metrics(labels, clusters, 10, 0.01)
    assert m["accuracy"] < 0.15
    assert abs(m["ari"]) < 0.01


def test_experts_in_use_threshold():
    clusters = np.array([0] * 95 + [1] * 4 + [2])
    labels = np.zeros(100, dtype=int)
    m = clustering_metrics(labels, clusters, 4, 0.04)
    assert m["experts_in_use"] == 2  # expert 2 has 1%, expert 3 none
    assert m["cluster_sizes"] == [95, 4, 1, 0]


def test_an_expert_given_nothing_is_not_in_use_even_at_min_fraction_0():
    """eval.in_use_min_fraction=0 counted every expert as in use, one given no input too."""
    m = clustering_metrics(np.zeros(3, dtype=int), np.array([0, 0, 1]), 3, 0.0)
    assert m["experts_in_use"] == 2 and m["cluster_sizes"] == [2, 1, 0]


def test_unlabelled_evaluation_counts_only_experts_given_inputs():
    """The evaluation without labels (its own count of experts in use): one input reaches one
    expert, so one is in use at in_use_min_fraction=0, not all four."""
    import torch

    from moe_vae.config import load_config
    from moe_vae.evaluate.evaluator import evaluate
    from moe_vae.model.mixture import MixtureOfVAEs

    cfg = load_config(None, ["--model.num_experts=4", "--eval.in_use_min_fraction=0"])
    torch.manual_seed(0)
    model = MixtureOfVAEs(cfg.model, (1, 4, 4))
    images = torch.randint(0, 256, (1, 1, 4, 4), dtype=torch.uint8)
    result = evaluate(model, [(images, torch.tensor([-1]))], cfg.loss, cfg.eval)
    assert result["experts_in_use"] == 1 and sum(result["cluster_sizes"]) == 1


def test_in_use_needs_a_share_above_0_and_the_minimum():
    """The one rule the evaluation and the trainer's experts/in_use (and revival) share."""
    from moe_vae.evaluate.metrics import in_use

    assert in_use([0.6, 0.0, 0.4], 0.0).tolist() == [True, False, True]
    assert in_use([0.95, 0.04, 0.01, 0.0], 0.04).tolist() == [True, True, False, False]
