"""Semi-supervised label policy: which samples are labelled, and the manager's label loss."""

from __future__ import annotations

import pytest
import torch

from moe_vae.config import load_config
from moe_vae.errors import MoeVaeError
from moe_vae.train.labels import LabelPolicy


def _policy(*overrides: str, experts: int = 10) -> LabelPolicy:
    return LabelPolicy(load_config(None, list(overrides)).loss, experts)


def test_fraction_picks_the_same_keys_every_time_in_about_that_share():
    keys = [f"train-{i:06d}" for i in range(20_000)]
    policy = _policy("--loss.label_fraction=0.1")
    picked = [k for k in keys if policy.is_labelled(k)]
    assert 0.09 < len(picked) / len(keys) < 0.11
    assert picked == [k for k in keys if _policy("--loss.label_fraction=0.1").is_labelled(k)]
    assert not _policy().active and not any(_policy().is_labelled(k) for k in keys[:100])


def test_listed_keys_and_targets(tmp_path):
    listing = tmp_path / "keys.txt"
    listing.write_text("a\nc\n\n")
    policy = _policy(f"--loss.labelled_keys={listing}")
    labels = torch.tensor([3, 4, -1, 5])
    targets = policy.targets(["a", "b", "c", "d"], labels)
    assert targets.tolist() == [3, -1, -1, -1]  # c is listed but its label is unknown
    logits = torch.randn(4, 10, requires_grad=True)
    loss = policy.loss(logits, targets)
    want = torch.nn.functional.cross_entropy(logits[:1], labels[:1]) / 4
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert logits.grad is not None and logits.grad[1:].abs().sum() == 0


def test_labels_beyond_the_experts_and_unreadable_lists_are_clear_errors(tmp_path):
    with pytest.raises(MoeVaeError, match=r"model\.num_experts must exceed"):
        _policy("--loss.label_fraction=1", experts=4).targets(["k"], torch.tensor([7]))
    with pytest.raises(MoeVaeError, match=r"loss\.labelled_keys .* cannot be read"):
        _policy(f"--loss.labelled_keys={tmp_path / 'missing.txt'}")


def test_replay_draws_labelled_samples_only_and_repeats_per_step(tmp_path):
    listing = tmp_path / "keys.txt"
    listing.write_text("k1\nk3\n")
    policy = _policy(f"--loss.labelled_keys={listing}")
    images = torch.arange(5, dtype=torch.uint8)[:, None].expand(5, 4).contiguous()
    keys = [f"k{i}" for i in range(5)]
    policy.pool(images, policy.targets(keys, torch.tensor([0, 1, 2, 3, 4])))
    a_img, a_lab = policy.replay(16, seed=0, step=7)
    b_img, b_lab = policy.replay(16, seed=0, step=7)
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)  # resume draws the same
    assert set(a_lab.tolist()) <= {1, 3} and torch.equal(a_img[:, 0].long(), a_lab)
    assert not torch.equal(policy.replay(16, seed=0, step=8)[1], a_lab)
    with pytest.raises(MoeVaeError, match="no training sample is labelled"):
        sparse = _policy("--loss.label_fraction=0.0001")
        sparse.pool(images[:1], sparse.targets(["a"], torch.tensor([0])))
