"""Evaluation: clustering metrics, the test-set pass, and the pictures of a run."""

from moe_vae.evaluate.evaluator import evaluate
from moe_vae.evaluate.metrics import (
    cluster_accuracy,
    clustering_metrics,
    contingency,
    many_to_one_accuracy,
)

__all__ = [
    "cluster_accuracy",
    "clustering_metrics",
    "contingency",
    "evaluate",
    "many_to_one_accuracy",
]
