"""Data sources. MNIST ships inside the package so the default run works offline."""

from moe_vae.data.mnist import MNIST_FILES, DataError, load_mnist, read_idx

__all__ = ["MNIST_FILES", "DataError", "load_mnist", "read_idx"]
