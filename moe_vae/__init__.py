"""moe-vae: a distributed trainer for Mixtures of Variational Autoencoders.

Importing the package has no side effects: heavy or optional dependencies (deepspeed, wandb)
are imported where they are used.
"""

__version__ = "0.1.0"
