"""Semi-supervised training: which samples' labels the trainer may use, and their loss term.

With `loss.labelled_batch` > 0 (in-memory data), every step also replays that many labelled
samples drawn from all of them, through the manager only: with few labels (100 of 60,000 is 0.17
per batch of 100) the labels otherwise barely reach the manager.

A sample is labelled when its key is in `loss.labelled_keys` (a text file, one key per line) or,
with `loss.label_fraction`, when a hash of its key falls below the fraction: the same samples on
every rank, worker, epoch and resume, with no list to ship. Label c asks the manager for expert
c (the founding material's π layer read as a classifier), so labels must be < num_experts.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_vae.config.schema import LossConfig
from moe_vae.errors import MoeVaeError


class LabelPolicy:
    def __init__(self, cfg: LossConfig, num_experts: int) -> None:
        self.fraction = cfg.label_fraction
        self.weight = cfg.label_weight
        self.num_experts = num_experts
        self.keys: set[str] | None = None
        if cfg.labelled_keys:
            path = Path(cfg.labelled_keys).expanduser()
            try:
                self.keys = {k.strip() for k in path.read_text().splitlines() if k.strip()}
            except OSError as err:
                raise MoeVaeError(
                    f"loss.labelled_keys {str(path)!r} cannot be read: {err.strerror} "
                    f"(expected a text file with one sample key per line)"
                ) from None

    @property
    def active(self) -> bool:
        return self.fraction > 0 or self.keys is not None

    def is_labelled(self, key: str) -> bool:
        if self.keys is not None and key in self.keys:
            return True
        return zlib.crc32(key.encode()) / 2**32 < self.fraction

    def targets(self, keys: list[str], labels_B: torch.Tensor) -> torch.Tensor:
        """The label of each labelled sample with a known label, -1 elsewhere: [B]."""
        use = torch.tensor([self.is_labelled(k) for k in keys], device=labels_B.device)
        targets_B = torch.where(use & (labels_B >= 0), labels_B, torch.full_like(labels_B, -1))
        self._check(targets_B)
        return targets_B

    def _check(self, labels: torch.Tensor) -> None:
        if len(labels) and bool((labels >= self.num_experts).any()):
            raise MoeVaeError(
                f"label {int(labels.max())} has no expert: semi-supervised training maps "
                f"label c to expert c, so model.num_experts must exceed every label "
                f"(it is {self.num_experts})"
            )

    def pool(self, images: torch.Tensor, targets_N: torch.Tensor) -> None:
        """Keep every labelled sample of an in-memory training set, for `labelled_batch`:
        those with a target in `targets_N` (what `targets` gives for all of them; checked)."""
        use = targets_N >= 0
        self.pool_images, self.pool_labels = images[use], targets_N[use]
        if len(self.pool_labels) == 0:
            raise MoeVaeError(
                "loss.labelled_batch > 0 but no training sample is labelled (check "
                "loss.label_fraction / loss.labelled_keys against the data's keys)"
            )

    def replay(self, size: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`size` labelled samples drawn with replacement for this step (seeded by the step, so
        a resumed run draws the same ones): (uint8 images, labels)."""
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(len(self.pool_labels), (size,), generator=gen)
        idx = idx.to(self.pool_labels.device)
        return self.pool_images[idx], self.pool_labels[idx]

    def loss(self, logits_BE: torch.Tensor, targets_B: torch.Tensor) -> torch.Tensor:
        return manager_cross_entropy(logits_BE, targets_B, self.weight)


def manager_cross_entropy(
    logits_BC: torch.Tensor, targets_B: torch.Tensor, weight: float | torch.Tensor
) -> torch.Tensor:
    """weight x the manager's cross-entropy on the samples with a target (-1: none), summed and
    divided by the batch size (so it scales like the per-sample VAE losses). Used by labels and
    by the warm start's pseudo-labels."""
    ce = F.cross_entropy(logits_BC, targets_B, ignore_index=-1, reduction="sum")
    return weight * ce / len(targets_B)
