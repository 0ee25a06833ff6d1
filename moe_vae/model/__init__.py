"""Single-device model math: expert banks, manager, mixture, losses.

Nothing here imports torch.distributed or deepspeed; parallelism is applied from outside.
"""

from moe_vae.model.dispatch import Dispatcher, LocalDispatcher
from moe_vae.model.experts import ConvExpertBank, ExpertBank, MLPExpertBank, build_expert_bank
from moe_vae.model.losses import LossTerms, objective
from moe_vae.model.manager import Manager
from moe_vae.model.mixture import MixtureOfVAEs, MixtureOutput

__all__ = [
    "ConvExpertBank",
    "Dispatcher",
    "ExpertBank",
    "LocalDispatcher",
    "LossTerms",
    "MLPExpertBank",
    "Manager",
    "MixtureOfVAEs",
    "MixtureOutput",
    "build_expert_bank",
    "objective",
]
