"""What the `moe-vae` commands after training do: eval, sample, assign, score, export.

Each loads the trained mixture on one process (moe_vae/evaluate/load.py) and reads inputs from
shards: the checkpoint's own data (MNIST's cached shards by default) or `--shards`.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from moe_vae.config.schema import Config
from moe_vae.data.build import EvalSet, ensure_mnist_shards
from moe_vae.data.loaders import load_in_memory
from moe_vae.data.shardlist import resolve
from moe_vae.errors import MoeVaeError
from moe_vae.evaluate.evaluator import evaluate, evaluation_losses, to_inputs
from moe_vae.evaluate.load import stored_prior
from moe_vae.evaluate.plots import tile
from moe_vae.model.losses import mixture_nll_per_input
from moe_vae.model.mixture import MixtureOfVAEs
from moe_vae.outpaths import check_out_file
from moe_vae.train.checkpoint import weights_metadata

# The file names each command's --out may have (eval writes its JSON under any name).
OUT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "eval": (),
    "sample": (".png", ".npy"),
    "assign": (".csv", ".parquet"),
    "score": (".csv", ".parquet"),
    "export": (".safetensors",),
}


def check_out(command: str, out: Path | None) -> None:
    """A command's --out, checked before the model is loaded: a bad one otherwise fails only
    when the result is written, after all the work."""
    if out is None:
        return
    check_out_file(out, OUT_SUFFIXES[command])
    if out.suffix == ".parquet":
        _pyarrow(out)


def _pyarrow(path: Path) -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MoeVaeError(
            f"--out {str(path)!r}: Parquet needs pyarrow (pip install pyarrow), or use .csv"
        ) from None
    return pa, pq


def input_set(
    cfg: Config,
    split: str,
    shards: str | None,
    limit: int | None,
    image_shape: tuple[int, int, int],
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """uint8 images [N, C, H, W], labels (-1 unknown) and keys of the inputs to use."""
    if shards is None:
        if cfg.data.name == "mnist":
            spec: str | list[str] | None = ensure_mnist_shards(cfg.data)[
                0 if split == "train" else 1
            ]
        else:
            spec = cfg.data.train_shards if split == "train" else cfg.data.test_shards
        if spec is None:
            raise MoeVaeError(f"the checkpoint's config has no {split} shards: pass --shards")
    else:
        spec = shards
    images, labels, keys, _ = load_in_memory(
        resolve(spec),
        image_shape,
        limit,
        cfg.data.max_bad_fraction,  # type: ignore[arg-type]
    )
    return images, labels, keys


def run_eval(
    model: MixtureOfVAEs, cfg: Config, images: torch.Tensor, labels: torch.Tensor, seed: int = 0
) -> dict[str, Any]:
    batches = EvalSet(images, labels).batches(cfg.eval.batch_size)
    return evaluate(model, batches, cfg.loss, cfg.eval, seed)


def expert_prior(path: Path, num_experts: int) -> np.ndarray:
    """Each expert's share of the manager's probability on the training data (last epoch), from
    the checkpoint or the .safetensors metadata; uniform when the file does not say (an export
    made before it was kept)."""
    share = stored_prior(path)
    if share and len(share) == num_experts:
        prior = np.asarray(share, dtype=np.float64)
        return prior / prior.sum()
    return np.full(num_experts, 1.0 / num_experts)


@torch.no_grad()
def run_sample(
    model: MixtureOfVAEs, n: int, expert: int | None, prior: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """n images [n, C, H, W] in [0, 1] and the expert of each (expert k, or drawn from prior)."""
    # z is drawn where the model lives: generate() takes it as is, and a CUDA model given a
    # CPU tensor fails. (A seed gives other images on CUDA than on the CPU.)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    if expert is not None:
        model._local_index(expert)  # a clear error for an unknown expert index
        experts = np.full(n, expert)
    else:
        experts = np.random.default_rng(seed).choice(len(prior), size=n, p=prior)
    z = torch.randn(n, model.cfg.z_dim, generator=gen, device=device)
    images = torch.empty(n, model.input_dim)
    for k in np.unique(experts):
        rows = torch.from_numpy(np.flatnonzero(experts == k))
        images[rows] = model.generate(z[rows.to(device)], int(k)).cpu()
    return images.view(n, *model.image_shape).numpy(), experts


def save_images(images: np.ndarray, path: Path, columns: int = 10) -> None:
    """.npy: the array; .png: a grid, `columns` images per row."""
    if path.suffix == ".npy":
        np.save(path, images)
        return
    if path.suffix != ".png":
        raise MoeVaeError(f"--out {str(path)!r}: expected a .png or .npy file name")
    from PIL import Image

    n, _, H, W = images.shape
    rows = -(-n // columns)
    padded = np.zeros((rows * columns, H, W))
    padded[:n] = images.mean(axis=1)
    grid = tile(padded.reshape(rows, columns, H, W))
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(path)


@torch.no_grad()
def per_input(
    model: MixtureOfVAEs, cfg: Config, images: torch.Tensor, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Manager probabilities [N, E] and mixture negative log-likelihood [N] of every input
    (`images` anywhere: each batch goes to the model's device, the results come back)."""
    # The noise generator must live on the model's device (the forward draws there), as in
    # evaluate(); a seed then gives other noise on CUDA than on the CPU.
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()  # greedy top-k routing, as evaluation
    probs, nll = [], []
    for start in range(0, len(images), cfg.eval.batch_size):
        x_BD = to_inputs(images[start : start + cfg.eval.batch_size].to(device))
        routed, logits_BE = evaluation_losses(model, x_BD, cfg.loss, gen)
        probs.append(routed.logits_BE.softmax(-1).cpu())
        nll.append(mixture_nll_per_input(logits_BE, routed.loss_BE).cpu())
    model.train(was_training)
    return torch.cat(probs).numpy(), torch.cat(nll).numpy()


def write_table(path: Path, columns: dict[str, Any]) -> None:
    """Columns of equal length to .csv (or .parquet when pyarrow is installed)."""
    if path.suffix == ".parquet":
        pa, pq = _pyarrow(path)
        pq.write_table(pa.table({k: list(v) for k, v in columns.items()}), path)
        return
    if path.suffix != ".csv":
        raise MoeVaeError(f"--out {str(path)!r}: expected a .csv or .parquet file name")
    names = list(columns)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        writer.writerows(zip(*(columns[n] for n in names), strict=True))


def run_export(model: MixtureOfVAEs, cfg: Config, out: Path, prior: list[float] | None) -> None:
    """The weights to `out`, with the config, image shape and mixing weights (`prior`, when the
    source has them) in its metadata."""
    if out.suffix != ".safetensors":
        raise MoeVaeError(f"--out {str(out)!r}: expected a .safetensors file name")
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = weights_metadata(cfg, model.image_shape, prior)
    try:
        save_file(weights, out, metadata=metadata)
    except SafetensorError as err:  # its I/O errors are not OSErrors
        raise MoeVaeError(f"--out {str(out)!r}: cannot write it: {err}") from None
