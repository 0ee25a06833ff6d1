"""Clustering metrics of the manager's argmax against labels (labels never reach training).

- accuracy: one-to-one Hungarian matching of clusters to classes (scipy); with more experts than
  classes the unmatched clusters count as errors, so also report
- many_to_one_accuracy: each cluster takes its majority class (the fair score when E > K);
- NMI and ARI from scikit-learn.
"""

from __future__ import annotations

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


def clustering_metrics(
    labels: np.ndarray, clusters: np.ndarray, num_clusters: int, in_use_min_fraction: float
) -> dict[str, Any]:
    sizes = np.bincount(clusters, minlength=num_clusters)
    return {
        "accuracy": cluster_accuracy(labels, clusters, num_clusters),
        "many_to_one_accuracy": many_to_one_accuracy(labels, clusters, num_clusters),
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "ari": float(adjusted_rand_score(labels, clusters)),
        "experts_in_use": int((sizes >= in_use_min_fraction * len(clusters)).sum()),
        "cluster_sizes": sizes.tolist(),
    }
