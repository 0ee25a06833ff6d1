"""How inputs reach the experts and per-expert losses come back to the inputs' owner.

Legend: B this rank's batch, N inputs a rank's experts see, E all experts, E_l local experts.
The model calls `dispatcher.expert_losses(x_BD, local_losses)`; `local_losses(x_ND, ids_N)` runs
this rank's experts and returns their losses [E_l, N]. `ids_N` are the inputs' positions in the
global batch (rank-major), so per-sample noise can be made identical however experts are sharded.
The local dispatcher here holds every expert; the all-to-all one lives in moe_vae.parallel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

LocalLosses = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Dispatcher(Protocol):
    def expert_losses(self, x_BD: torch.Tensor, local_losses: LocalLosses) -> torch.Tensor:
        """Loss of every expert on every input of this rank: [B, E]."""
        ...


class LocalDispatcher:
    """All experts on this device: every input goes to every expert, nothing moves."""

    def expert_losses(self, x_BD: torch.Tensor, local_losses: LocalLosses) -> torch.Tensor:
        ids_B = torch.arange(len(x_BD), device=x_BD.device)
        return local_losses(x_BD, ids_B).transpose(0, 1)
