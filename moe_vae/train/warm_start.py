"""Warm start from clusters: pseudo-labels that pull the manager toward a good first partition.

A mixture of VAEs trained from random weights settles in whatever partition its first steps
favour (MNIST: 3/5/8 and 4/7/9 shared between experts). With `warm_start.method: cluster` the
training images are first embedded with UMAP (a k-nearest-neighbour graph of the images, laid
out in `dims` dimensions) and clustered by a full-covariance Gaussian mixture, refit from
`restarts` k-means++ starts and kept at the highest likelihood. Cluster k then asks the manager
for expert k through a cross-entropy term, whose weight is held and then decayed to 0; the
experts follow the manager (each is trained on the inputs routed to it). No label is read.

The clustering is deterministic given the images, the settings and train.seed, so it is cached
under the moe-vae cache (a rerun or an ablation skips it) and saved in the checkpoint.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from moe_vae.config.schema import WarmStartConfig
from moe_vae.data.cache import default_cache
from moe_vae.errors import MoeVaeError


def cluster_images(
    images: torch.Tensor, num_clusters: int, cfg: WarmStartConfig, seed: int
) -> np.ndarray:
    """A cluster id in [0, num_clusters) for each image: UMAP embedding + Gaussian mixture."""
    try:
        import umap
    except ImportError as err:  # an optional install could lack numba's LLVM runtime
        raise MoeVaeError(
            f"warm_start.method=cluster needs umap-learn ({err}); pip install 'umap-learn>=0.5'"
        ) from None
    from sklearn.mixture import GaussianMixture

    x = images.reshape(len(images), -1).cpu().numpy().astype(np.float32) / 255.0
    with warnings.catch_warnings():  # "n_jobs overridden by random_state": wanted, reproducible
        warnings.simplefilter("ignore", UserWarning)
        reducer = umap.UMAP(
            n_neighbors=cfg.neighbors,
            n_components=cfg.dims,
            min_dist=0.0,
            random_state=seed,
        )
        emb = reducer.fit_transform(x)
    gmm = GaussianMixture(
        num_clusters,
        covariance_type="full",
        n_init=cfg.restarts,
        init_params="k-means++",
        random_state=seed,
    )
    return gmm.fit(emb).predict(emb).astype(np.int64)


def cached_clusters(
    images: torch.Tensor,
    num_clusters: int,
    cfg: WarmStartConfig,
    seed: int,
    cache_dir: Path | None = None,
    log: bool = True,
) -> np.ndarray:
    """cluster_images, read from / written to the cache (keyed by the images and settings)."""
    digest = hashlib.sha1(images.cpu().numpy().tobytes())
    digest.update(repr((num_clusters, cfg.neighbors, cfg.dims, cfg.restarts, seed)).encode())
    path = (cache_dir or default_cache()) / "warm_start" / f"{digest.hexdigest()[:20]}.npy"
    if path.exists():
        clusters = np.load(path)
        if clusters.shape == (len(images),):
            return clusters
    t0 = time.perf_counter()
    clusters = cluster_images(images, num_clusters, cfg, seed)
    if log:
        sizes = np.bincount(clusters, minlength=num_clusters).tolist()
        print(
            f"warm start: {len(images)} images in {num_clusters} clusters "
            f"({time.perf_counter() - t0:.0f} s), sizes {sizes}",
            flush=True,
        )
    tmp = path.with_suffix(".tmp.npy")
    try:  # a cache: a folder it cannot write to costs the next run this time again, no more
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp, clusters)
        tmp.replace(path)
    except OSError as err:
        warnings.warn(
            f"warm start: clusters not cached in {str(path.parent)!r}: {err}", stacklevel=2
        )
    return clusters


class ClusterAnchor:
    """The pseudo-label term: targets per batch (by sample key) and its weight per epoch."""

    def __init__(self, cfg: WarmStartConfig, keys: np.ndarray, clusters: np.ndarray) -> None:
        if len(keys) != len(clusters):
            raise MoeVaeError(
                f"warm start: {len(clusters)} saved clusters for {len(keys)} training samples "
                f"(the training data changed since the run started)"
            )
        self.cfg = cfg
        self.clusters = clusters
        self.by_key = dict(zip((str(k) for k in keys), clusters.tolist(), strict=True))

    def weight(self, epoch: int) -> float:
        """`weight` through hold_epochs, then linearly to 0 over decay_epochs (1-based epochs)."""
        past = epoch - self.cfg.hold_epochs
        if past <= 0:
            return self.cfg.weight
        if past > self.cfg.decay_epochs:
            return 0.0
        return self.cfg.weight * (1.0 - past / (self.cfg.decay_epochs + 1))

    def targets(self, keys: list[str], device: torch.device) -> torch.Tensor:
        """Each sample's cluster (-1 for a key that was not clustered): [B]."""
        return torch.tensor([self.by_key.get(k, -1) for k in keys], device=device)
