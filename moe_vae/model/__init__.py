"""Single-device model math: expert banks, manager, mixture, losses.

Nothing here imports torch.distributed or deepspeed; parallelism is applied from outside.
"""

from moe_vae.model.experts import ConvExpertBank, ExpertBank, MLPExpertBank, build_expert_bank
from moe_vae.model.losses import LossTerms, mixture_objective
from moe_vae.model.manager import Manager
from moe_vae.model.mixture import MixtureOfVAEs, MixtureOutput

__all__ = [
    "ConvExpertBank",
    "ExpertBank",
    "LossTerms",
    "MLPExpertBank",
    "Manager",
    "MixtureOfVAEs",
    "MixtureOutput",
    "build_expert_bank",
    "mixture_objective",
]
