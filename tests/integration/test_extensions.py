"""The founding material's extensions, trained for real on small MNIST: a hierarchical mixture
and the warm start from clusters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_vae.config import load_config
from moe_vae.errors import MoeVaeError
from moe_vae.evaluate.evaluator import to_inputs
from moe_vae.train import train
from moe_vae.train import trainer as trainer_module
from moe_vae.train.trainer import Trainer


def _tiny(tmp_path, name, *extra):
    return load_config(
        "configs/tiny.yaml", [f"--output.dir={tmp_path}", f"--output.name={name}", *extra]
    )


def test_hierarchical_mixture_trains_and_samples_every_leaf(tmp_path, monkeypatch, repo):
    monkeypatch.chdir(repo)
    cfg = _tiny(tmp_path, "h", "--model.hierarchy=[2,2]", "--train.epochs=1")
    trainer = Trainer(cfg, quiet=True)
    result = trainer.fit()
    assert len(result.final_eval["confusion"]) == 2  # clusters are the 2 top-level experts
    assert np.isfinite(result.epochs[-1]["loss/total"])
    assert (result.run_dir / "hierarchy_samples.png").stat().st_size > 0
    leaves = trainer.leaf_samples(n=3)
    assert leaves is not None and leaves.shape == (2, 2, 3, 784)
    flat = torch.from_numpy(leaves.reshape(4, -1))
    assert torch.cdist(flat, flat).add(torch.eye(4)).min() > 0  # four different decoders
    for leaf in range(4):  # the sampling API reaches every leaf
        assert trainer.model.sample(2, leaf).shape == (2, 784)


def test_warm_start_anchors_the_manager_to_the_clusters_and_resumes(tmp_path, monkeypatch, repo):
    monkeypatch.chdir(repo)
    extra = ["--warm_start.method=cluster", "--warm_start.weight=100", "--train.epochs=3"]
    trainer = Trainer(_tiny(tmp_path, "w", *extra, "--train.checkpoint_every=10"), quiet=True)
    trainer.fit()
    assert trainer.anchor is not None
    clusters = trainer.anchor.clusters
    assert len(clusters) == 500 and len(np.unique(clusters)) == 4
    data = trainer.data.train
    assigned = trainer.model.assign(to_inputs(data.images)).numpy()
    # cluster k -> expert k with no matching (chance: about 0.25)
    assert (assigned == clusters).mean() > 0.75
    assert trainer.epochs[-1]["warm_start/weight"] == 100.0

    def not_again(*args, **kwargs):
        raise AssertionError("resume recomputed the clusters")

    monkeypatch.setattr(trainer_module, "cached_clusters", not_again)
    ckpt = tmp_path / "w" / "checkpoint.pt"
    resumed = Trainer(_tiny(tmp_path, "w", *extra, f"--train.resume={ckpt}"), quiet=True)
    assert resumed.anchor is not None
    assert np.array_equal(resumed.anchor.clusters, clusters)


def test_warm_start_needs_in_memory_data(tmp_path, monkeypatch, repo):
    monkeypatch.chdir(repo)
    cfg = _tiny(
        tmp_path,
        "s",
        "--warm_start.method=cluster",
        "--data.loader=stream",
        "--data.train_limit=null",
    )
    with pytest.raises(MoeVaeError, match=r"warm_start\.method=cluster needs in-memory"):
        train(cfg, quiet=True)
