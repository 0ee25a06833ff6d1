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
