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
