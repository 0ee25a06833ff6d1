"""Warm start from clusters: the clustering, its cache and the anchor's schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_vae.config.schema import WarmStartConfig
from moe_vae.errors import MoeVaeError
from moe_vae.evaluate.metrics import cluster_accuracy
from moe_vae.train import warm_start
from moe_vae.train.warm_start import ClusterAnchor, cached_clusters


def blobs(n_per: int = 60, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Three kinds of 8x8 images (bars at different places) with pixel noise: uint8 [N,1,8,8]."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k in range(3):
        base = np.zeros((8, 8))
        base[:, 2 * k : 2 * k + 3] = 1.0
        noisy = base + 0.3 * rng.standard_normal((n_per, 8, 8))
        images.append(np.clip(noisy, 0, 1))
        labels += [k] * n_per
    x = (np.concatenate(images) * 255).round().astype(np.uint8)[:, None]
    return torch.from_numpy(x), np.asarray(labels)


def test_clusters_recover_separated_groups_and_are_cached(tmp_path, monkeypatch):
    images, labels = blobs()
    cfg = WarmStartConfig(method="cluster", neighbors=10, dims=2, restarts=2)
    clusters = cached_clusters(images, 3, cfg, seed=0, cache_dir=tmp_path, log=False)
    assert clusters.shape == (180,) and clusters.dtype == np.int64
    assert cluster_accuracy(labels, clusters, 3) > 0.95

    def fail(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(warm_start, "cluster_images", fail)
    again = cached_clusters(images, 3, cfg, seed=0, cache_dir=tmp_path, log=False)
    assert np.array_equal(again, clusters)
    with pytest.raises(AssertionError, match="cache was not used"):  # other settings: no hit
        cached_clusters(images, 3, cfg, seed=1, cache_dir=tmp_path, log=False)


def test_an_unwritable_cache_warns_and_keeps_the_clusters(tmp_path):
    """The clusters took minutes to compute: a cache folder that cannot be made costs the
    cache, not the run."""
    images, _ = blobs(n_per=20)
    (tmp_path / "afile").write_text("x")
    cfg = WarmStartConfig(method="cluster", neighbors=5, dims=2, restarts=1)
    with pytest.warns(UserWarning, match="clusters not cached in"):
        clusters = cached_clusters(images, 3, cfg, seed=0, cache_dir=tmp_path / "afile", log=False)
    assert clusters.shape == (60,)


def test_anchor_weight_holds_then_decays_to_zero():
    cfg = WarmStartConfig(method="cluster", weight=10.0, hold_epochs=2, decay_epochs=3)
    anchor = ClusterAnchor(cfg, np.array(["a", "b"]), np.array([1, 0]))
    assert [anchor.weight(e) for e in range(1, 8)] == [10.0, 10.0, 7.5, 5.0, 2.5, 0.0, 0.0]
    assert anchor.targets(["b", "a", "zz"], torch.device("cpu")).tolist() == [0, 1, -1]


def test_anchor_refuses_clusters_of_other_data():
    cfg = WarmStartConfig(method="cluster")
    with pytest.raises(MoeVaeError, match="training data changed"):
        ClusterAnchor(cfg, np.array(["a", "b", "c"]), np.array([0, 1]))
