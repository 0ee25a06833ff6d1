"""Top-k with grouped GEMM: the jagged layout and its alignment padding, and the same losses
and gradients as the capacity-padded batched matmul."""

import pytest
import torch

from moe_vae.config import load_config
from moe_vae.config.schema import LossConfig, ModelConfig
from moe_vae.errors import MoeVaeError
from moe_vae.evaluate.load import _layout_for
from moe_vae.model.dispatch import plan_slots
from moe_vae.model.grouped import (
    alignment,
    check_grouped_device,
    pack_grouped,
    unpack_grouped,
)
from moe_vae.model.losses import objective
from moe_vae.model.mixture import MixtureOfVAEs


def test_layout_aligns_groups_and_absorbs_slack_in_the_last():
    idx = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 0]])  # B=4, K=2, E=3
    slot, _ = plan_slots(idx, 3)
    kept = slot < 3  # expert 2 has 4 inputs: its fourth is dropped
    x = torch.arange(4.0)[:, None] * torch.ones(1, 5)
    x_RD, ids_R, groups, row = pack_grouped(x, idx, slot, kept, 3, id_offset=100)
    a = alignment(torch.float32)
    assert a == 4  # 16 bytes of fp32
    # groups: expert 0 has 3 inputs -> 4 rows, expert 1 one -> 4 rows, expert 2 the rest
    assert groups.offs_E.dtype == torch.int32
    R = len(x_RD)
    assert groups.offs_E.tolist() == [4, 8, R] and R % a == 0
    assert len(x_RD) >= 8 + a
    assert groups.expert_R.tolist() == [0] * 4 + [1] * 4 + [2] * (R - 8)
    # expert 0's rows hold inputs 0, 2, 3 in batch order, then a zero padding row
    assert x_RD[:4, 0].tolist() == [0.0, 2.0, 3.0, 0.0]
    assert ids_R[:3].tolist() == [100, 102, 103]
    assert x_RD[8:11, 0].tolist() == [0.0, 1.0, 2.0]  # expert 2: inputs 0, 1, 2
    loss_R = torch.arange(float(R))
    loss = unpack_grouped(loss_R, row, kept).view(4, 2)
    assert loss.tolist() == [[8.0, 0.0], [9.0, 4.0], [1.0, 10.0], [0.0, 2.0]]  # dropped pair: 0


def test_an_expert_without_inputs_still_gets_an_aligned_group():
    """No group of 0 rows (a K=0 GEMM in the weight gradient): expert 1 gets `align` zero rows,
    and the layout still holds every pair of the worst case (all pairs on one expert)."""
    a = alignment(torch.float32)
    idx = torch.tensor([[0], [2], [0]])  # B=3, K=1, E=3: expert 1 has nothing
    slot, _ = plan_slots(idx, 3)
    x_RD, _, groups, row = pack_grouped(torch.ones(3, 5), idx, slot, slot < 3, 3)
    assert groups.offs_E.tolist() == [a, 2 * a, len(x_RD)] and len(x_RD) >= 3 * a
    assert x_RD[a : 2 * a].abs().sum() == 0  # expert 1's rows: padding only
    everyone = torch.zeros(16, 1, dtype=torch.long)  # 16 pairs, all on expert 0
    slot, _ = plan_slots(everyone, 3)
    x_RD, _, groups, row = pack_grouped(torch.ones(16, 5), everyone, slot, slot < 16, 3)
    assert groups.offs_E.tolist() == [16, 16 + a, len(x_RD)] and len(x_RD) >= 16 + 2 * a
    assert row.max() < 16


@pytest.mark.parametrize("z_dim,capacity_factor", [(3, 0.0), (2, 0.75)])
def test_grouped_equals_batched(z_dim, capacity_factor):
    """Odd feature widths exercise the 16-byte feature padding; 0.75 drops pairs."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        num_experts=5,
        z_dim=z_dim,
        encoder_layers=[7],
        decoder_layers=[6],
        manager_layers=[8],
        routing="topk",
        top_k=2,
        capacity_factor=capacity_factor,
    )
    batched = MixtureOfVAEs(cfg, (1, 3, 3))
    grouped = MixtureOfVAEs(cfg.model_copy(update={"expert_gemm": "grouped"}), (1, 3, 3))
    grouped.load_state_dict(batched.state_dict())
    eps = torch.randn(5, 24, z_dim)
    for m in (batched, grouped):
        m.noise = lambda e, n, z: eps[e, n]
    x = torch.rand(24, 9)
    loss_cfg = LossConfig(objective="mixture")
    ra, rb = batched.losses(x, loss_cfg), grouped.losses(x, loss_cfg)
    assert ra.dropped.item() == rb.dropped.item()
    assert (ra.dropped.item() > 0) == (capacity_factor > 0)
    torch.testing.assert_close(rb.loss_BE, ra.loss_BE)
    a, b = objective(ra, loss_cfg), objective(rb, loss_cfg)
    a.total.backward()
    b.total.backward()
    for (name, p), q in zip(batched.named_parameters(), grouped.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_compiled_grouped_gemm_runs_bf16_with_close_gradients():
    """Under torch.compile the grouped GEMM runs in bf16 (as on a GPU): the loss and the
    gradients stay within bf16's error of the eager fp32 ones."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        num_experts=4,
        z_dim=3,
        encoder_layers=[16],
        decoder_layers=[16],
        manager_layers=[8],
        routing="topk",
        capacity_factor=0.0,
        expert_gemm="grouped",
    )
    model = MixtureOfVAEs(cfg, (1, 4, 4))
    eps = torch.randn(4, 32, 3)
    model.noise = lambda e, n, z: eps[e, n]
    x, loss_cfg = torch.rand(32, 16), LossConfig()

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn(x)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    def step(x):
        return objective(model.losses(x, loss_cfg), loss_cfg).total

    eager_loss, eager_grads = loss_and_grads(step)
    try:
        compiled_loss, compiled_grads = loss_and_grads(torch.compile(step))
    finally:
        torch._dynamo.reset()  # the model's frames stay compiled otherwise
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-2, atol=0)
    for (name, _), g, ref in zip(
        model.named_parameters(), compiled_grads, eager_grads, strict=True
    ):
        scale = ref.abs().max().item()
        torch.testing.assert_close(g, ref, rtol=0, atol=0.03 * scale, msg=name)
        assert not torch.equal(g, ref) or scale == 0  # the compiled GEMM really ran in bf16


def test_grouped_needs_topk_mlp_experts():
    with pytest.raises(ValueError, match=r"expert_gemm=grouped needs model\.routing: topk"):
        ModelConfig(expert_gemm="grouped")
    with pytest.raises(ValueError, match="expert conv"):
        ModelConfig(expert_gemm="grouped", routing="topk", expert="conv")


def test_more_experts_than_cuda_groups_is_refused_on_a_gpu_only():
    """CUDA's grouped GEMM takes fewer than 1024 groups (one per expert): refused before any
    work on a GPU; the CPU's loop takes any number."""
    check_grouped_device(4096, torch.device("cpu"))
    with pytest.raises(MoeVaeError, match=r"1024 experts on one GPU.* at most 1023 groups"):
        check_grouped_device(1024, torch.device("cuda"))
    if not torch.cuda.is_available():  # no capability to look up: nothing more to say
        check_grouped_device(1023, torch.device("cuda"))


def test_a_grouped_model_too_large_for_cuda_evaluates_batched_there():
    cfg = load_config(
        "configs/tiny.yaml",
        ["--model.routing=topk", "--model.expert_gemm=grouped", "--model.num_experts=1024"],
    )
    assert _layout_for(cfg, "cpu") is cfg
    with pytest.warns(UserWarning, match=r"evaluating in the batched layout instead"):
        on_gpu = _layout_for(cfg, "cuda")
    assert on_gpu.model.expert_gemm == "batched"
    assert on_gpu.model.model_dump(exclude={"expert_gemm"}) == cfg.model.model_dump(
        exclude={"expert_gemm"}
    )
