"""Grouped GEMM for top-k routing: each expert's inputs are one contiguous group of rows, and
every layer of all experts is one `torch._grouped_mm` over the jagged groups, instead of a
batched matmul over inputs padded to a fixed capacity per expert.

Legend: B inputs, K choices per input, P = B*K (input, expert) pairs, E experts, R rows of the
grouped layout, D input, I / O layer input / output features.

The kernel's alignment rules (CUDA, checked by torch's meta functions, so by torch.compile on
any device too): every row stride a multiple of 16 bytes, and bf16 operands. So feature dims
are zero-padded to 16 bytes, and each group starts on a 16-byte row boundary (the weight
gradient is a grouped GEMM whose groups run along the rows). The layout has a fixed size,
R = round_up(P + E*align, align), whatever the routing: no host sync to size it, and
static shapes for CUDA graphs. The last group absorbs the slack rows (zero inputs, their
losses unused, so zero gradient).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_vae.errors import MoeVaeError

# CUDA's grouped kernel (CUTLASS, Hopper and Blackwell) takes fewer than 1024 groups in one
# call: it prepares them in one thread block, a thread per group (ATen GroupMM.cu checks
# "Can't process more than 1024 groups"). One group per expert, so at most this many experts.
CUDA_MAX_GROUPS = 1023


@dataclass
class Groups:
    offs_E: torch.Tensor  # int32 [E]: the row after each expert's group (the last one is R)
    expert_R: torch.Tensor  # long [R]: the expert (bank index) of each row


def gemm_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the grouped GEMM runs in: bf16 on CUDA and under torch.compile (the kernel's
    and its meta function's only plain dtype); the input's own dtype in eager CPU runs."""
    if t.is_cuda or torch.compiler.is_compiling():
        return torch.bfloat16
    return t.dtype


def alignment(dtype: torch.dtype) -> int:
    """Elements in 16 bytes: rows and features are padded to multiples of this."""
    return 16 // dtype.itemsize


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pack_grouped(
    x_BD: torch.Tensor,
    idx_BK: torch.Tensor,
    slot_P: torch.Tensor,
    kept_P: torch.Tensor,
    num_experts: int,
    id_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, Groups, torch.Tensor]:
    """The kept pairs laid out by expert: (x [R, D] (zeros in padding rows), global ids [R],
    groups, row of each pair [P] (meaningful where kept))."""
    B, K = idx_BK.shape
    E, align = num_experts, alignment(gemm_dtype(x_BD))
    e_P = idx_BK.flatten()
    # No bincount or boolean indexing: both are host syncs on a GPU.
    kept_E = torch.zeros(E, dtype=e_P.dtype, device=e_P.device)
    kept_E.scatter_add_(0, e_P, kept_P.to(e_P.dtype))
    # Every group gets at least `align` rows: an expert with no input would make a group of 0
    # rows, a K=0 GEMM in the weight gradient, which CUDA's grouped kernel is reported to hang
    # on (pytorch/pytorch#152668). Sum of sizes <= P + E * align: R never runs short.
    size_E = ((kept_E + align - 1) // align).clamp_min(1) * align
    end_E = torch.cumsum(size_E, 0)
    R = _round_up(B * K + E * align, align)
    row_P = (end_E - size_E)[e_P] + slot_P
    b_P = torch.arange(B * K, device=x_BD.device) // K  # input of each pair, k-minor
    rows_P = torch.where(kept_P, row_P, R)  # dropped pairs go to a spare row, cut off below
    x_RD = x_BD.new_zeros(R + 1, x_BD.shape[1])
    x_RD[rows_P] = x_BD[b_P]
    ids_R = torch.zeros(R + 1, dtype=torch.long, device=x_BD.device)
    ids_R[rows_P] = b_P + id_offset
    x_RD, ids_R = x_RD[:R], ids_R[:R]
    # The last group ends at R (it takes the slack rows). No `offs_E[-1] = R`: a Python
    # number written into a device tensor goes through a host tensor.
    offs_E = torch.cat([end_E[:-1], end_E.new_full((1,), R)]).to(torch.int32)
    expert_R = torch.searchsorted(
        offs_E, torch.arange(R, device=x_BD.device, dtype=torch.int32), right=True
    )
    return x_RD, ids_R, Groups(offs_E, expert_R), row_P


def unpack_grouped(loss_R: torch.Tensor, row_P: torch.Tensor, kept_P: torch.Tensor) -> torch.Tensor:
    """Each pair's loss in pair order [P] (0 where dropped)."""
    loss_P = loss_R[row_P.clamp(max=len(loss_R) - 1)]  # a dropped pair's row may lie past R
    return torch.where(kept_P, loss_P, torch.zeros_like(loss_P))


def grouped_linear(
    h_RI: torch.Tensor, w_EIO: torch.Tensor, b_EO: torch.Tensor, groups: Groups
) -> torch.Tensor:
    """Row r through expert expert_R[r]'s layer: [R, O], one grouped GEMM."""
    dtype = gemm_dtype(h_RI)
    a = alignment(dtype)
    I, O = w_EIO.shape[1:]
    pad_i, pad_o = _round_up(I, a) - I, _round_up(O, a) - O
    h, w = h_RI.to(dtype), w_EIO.to(dtype)
    if pad_i or pad_o:  # zero features add nothing; the extra outputs are cut off below
        h = F.pad(h, (0, pad_i))
        w = F.pad(w, (0, pad_o, 0, pad_i))
    out_RO = torch._grouped_mm(h.contiguous(), w.contiguous(), offs=groups.offs_E)
    return out_RO[:, :O].to(h_RI.dtype) + b_EO[groups.expert_R]


def check_grouped_device(num_experts: int, device: torch.device) -> None:
    """expert_gemm=grouped on `device`, before any work: more experts than CUDA's kernel takes
    groups is one error; a GPU without that kernel (before Hopper) is a warning, since torch's
    fallback loops over the groups reading their sizes back, a host sync in every layer."""
    if device.type != "cuda":
        return  # the CPU's grouped GEMM loops over any number of groups
    if num_experts > CUDA_MAX_GROUPS:
        raise MoeVaeError(
            f"model.expert_gemm=grouped: {num_experts} experts on one GPU, but CUDA's grouped "
            f"GEMM takes at most {CUDA_MAX_GROUPS} groups (one per expert): use "
            f"model.expert_gemm: batched"
        )
    if torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] < 9:
        warnings.warn(
            "model.expert_gemm=grouped on a GPU before Hopper (compute capability < 9.0): "
            "torch's fallback reads each group's size back to the host in every layer; "
            "model.expert_gemm: batched avoids those syncs",
            stacklevel=2,
        )
