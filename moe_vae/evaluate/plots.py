"""PNG figures of a run, so a user without a tracker sees the same story.

- expert grid (the seed's figure): rows = epochs, columns = experts, one shared z per row;
- loss curves: expected expert loss, balancing and total per epoch;
- expert usage: each expert's share of the manager's probability;
- confusion: expert x class counts (labelled evaluation data only);
- reconstructions: inputs above their reconstruction by the assigned expert;
- hierarchy samples: samples of every leaf, a row per top-level expert (hierarchies only).
matplotlib is imported here only, with the Agg backend (no display needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tile(images_RCHW: np.ndarray) -> np.ndarray:
    """[rows, cols, H, W] -> one [rows*H, cols*W] image."""
    R, C, H, W = images_RCHW.shape
    return images_RCHW.transpose(0, 2, 1, 3).reshape(R * H, C * W)


def save_expert_grid(
    rows: Sequence[np.ndarray],
    image_shape: tuple[int, int, int],
    path: str | Path,
    row_labels: Sequence[str],
) -> None:
    """rows: one [E, D] array per epoch (every expert decoding the same z), values in [0, 1]."""
    plt = _pyplot()
    C, H, W = image_shape
    stack = np.stack(rows)  # [R, E, D]
    R, E = stack.shape[:2]
    images = stack.reshape(R, E, C, H, W).mean(axis=2)  # grey view of multi-channel images
    fig_w = max(4.0, 0.5 * E + 1.0)
    fig, ax = plt.subplots(figsize=(fig_w, max(2.0, 0.5 * R * fig_w / (0.5 * E + 1.0) + 0.8)))
    ax.imshow(tile(images), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(np.arange(E) * W + W / 2, [str(e) for e in range(E)])
    step = max(1, R // 25)  # keep the row labels readable for 100 epochs
    ax.set_yticks(np.arange(0, R, step) * H + H / 2, [row_labels[r] for r in range(0, R, step)])
    ax.set_xlabel("expert")
    ax.set_ylabel("epoch")
    ax.set_title("one shared z decoded by every expert")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_loss_curves(epochs: Sequence[dict], path: str | Path) -> None:
    """One panel each for the expected expert loss, the balancing term and the total loss."""
    plt = _pyplot()
    x = [r["epoch"] for r in epochs]
    keys = [
        ("loss/expected", "expected expert loss"),
        ("loss/balancing", "balancing (variance)"),
        ("loss/total", "total loss"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (key, title) in zip(axes, keys, strict=True):
        ax.plot(x, [r[key] for r in epochs], marker="o" if len(x) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_expert_usage(importance: Sequence[float], path: str | Path) -> None:
    """Bar chart of each expert's share of the manager's probability mass."""
    plt = _pyplot()
    E = len(importance)
    fig, ax = plt.subplots(figsize=(max(4.0, min(0.3 * E, 16.0)), 3))
    ax.bar(range(E), importance, width=0.9)
    ax.axhline(1 / E, color="gray", linestyle="--", linewidth=1, label="uniform")
    ax.set_xlabel("expert")
    ax.set_ylabel("share of probability")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_confusion(confusion: Sequence[Sequence[int]], path: str | Path) -> None:
    """Expert x class counts as a heat map (rows = experts, columns = classes)."""
    plt = _pyplot()
    table = np.asarray(confusion)
    E, K = table.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * K + 2), max(3.0, min(0.35 * E + 1, 20.0))))
    im = ax.imshow(table, cmap="viridis", aspect="auto")
    ax.set_xlabel("class")
    ax.set_ylabel("expert")
    ax.set_xticks(range(K))
    if E <= 40:
        ax.set_yticks(range(E))
        for e in range(E):
            for k in range(K):
                if table[e, k]:
                    ax.text(
                        k,
                        e,
                        str(table[e, k]),
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if table[e, k] < table.max() / 2 else "black",
                    )
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_reconstructions(
    pairs: np.ndarray, image_shape: tuple[int, int, int], path: str | Path
) -> None:
    """pairs [2, N, D]: inputs (top row) and reconstructions by their assigned expert."""
    plt = _pyplot()
    C, H, W = image_shape
    images = pairs.reshape(2, -1, C, H, W).mean(axis=2)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * images.shape[1]), 1.6))
    ax.imshow(tile(images), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([H / 2, H + H / 2], ["input", "recon"])
    ax.set_xticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_hierarchy_grid(
    images_TLND: np.ndarray, image_shape: tuple[int, int, int], path: str | Path
) -> None:
    """A hierarchical mixture's samples: a row per top-level expert, a block of N columns per
    leaf under it (images_TLND: [top-level experts, leaves each, samples, D] in [0, 1])."""
    plt = _pyplot()
    C, H, W = image_shape
    T, L, N = images_TLND.shape[:3]
    grey = images_TLND.reshape(T, L * N, C, H, W).mean(axis=2)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * L * N + 1.0), max(2.0, 0.45 * T + 0.8)))
    ax.imshow(tile(grey), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for leaf in range(1, L):  # a line between the leaves' blocks
        ax.axvline(leaf * N * W - 0.5, color="red", linewidth=1)
    ax.set_xticks(np.arange(L) * N * W + N * W / 2, [f"sub-expert {leaf}" for leaf in range(L)])
    ax.set_yticks(np.arange(T) * H + H / 2, [str(t) for t in range(T)])
    ax.set_ylabel("top-level expert")
    ax.set_title(f"{N} samples (z ~ N(0, I)) from every leaf")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
