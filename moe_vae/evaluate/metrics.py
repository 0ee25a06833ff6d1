"""Clustering metrics of the manager's argmax against labels (of the test split by default).

- accuracy: one-to-one Hungarian matching of clusters to classes (scipy); with more experts than
  classes the unmatched clusters count as errors, so also report
- many_to_one_accuracy: each cluster takes its majority class (the fair score when E > K);
- NMI and ARI from scikit-learn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def contingency(labels: np.ndarray, clusters: np.ndarray, num_clusters: int) -> np.ndarray:
    """Counts [num_clusters, num_classes]: row = expert, column = class."""
    num_classes = int(labels.max()) + 1 if labels.size else 0
    table = np.zeros((num_clusters, num_classes), dtype=np.int64)
    np.add.at(table, (clusters, labels), 1)
    return table


def cluster_accuracy(labels: np.ndarray, clusters: np.ndarray, num_clusters: int) -> float:
    table = contingency(labels, clusters, num_clusters)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / max(len(labels), 1))


def many_to_one_accuracy(labels: np.ndarray, clusters: np.ndarray, num_clusters: int) -> float:
    table = contingency(labels, clusters, num_clusters)
    return float(table.max(axis=1).sum() / max(len(labels), 1))


def in_use(share: Sequence[float] | np.ndarray, min_fraction: float) -> np.ndarray:
    """Which experts are in use, from each one's share of the inputs: more than none and at
    least `min_fraction` (eval.in_use_min_fraction). The share must be above 0 too: at a
    minimum of 0, an expert given no input would otherwise count. Evaluation, the trainer's
    experts/in_use and revival's dead experts all go by this."""
    share_E = np.asarray(share, dtype=np.float64)
    return (share_E > 0) & (share_E >= min_fraction)


def cluster_usage(clusters: np.ndarray, num_clusters: int, min_fraction: float) -> dict[str, Any]:
    """How many experts are in use, and each one's count of inputs."""
    sizes = np.bincount(clusters, minlength=num_clusters)
    share = sizes / max(len(clusters), 1)
    return {
        "experts_in_use": int(in_use(share, min_fraction).sum()),
        "cluster_sizes": sizes.tolist(),
    }


def clustering_metrics(
    labels: np.ndarray, clusters: np.ndarray, num_clusters: int, in_use_min_fraction: float
) -> dict[str, Any]:
    return {
        "accuracy": cluster_accuracy(labels, clusters, num_clusters),
        "many_to_one_accuracy": many_to_one_accuracy(labels, clusters, num_clusters),
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "ari": float(adjusted_rand_score(labels, clusters)),
        **cluster_usage(clusters, num_clusters, in_use_min_fraction),
    }
