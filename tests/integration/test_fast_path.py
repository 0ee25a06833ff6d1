"""The GPU fast path's switches, checked on a CPU against the plain step.

train.compile: the compiled step (what reduce-overhead turns into CUDA graphs on a GPU) computes
the same losses and weights as the eager step. Compiled, the grouped GEMM runs in bf16 (what it
does on a GPU), so that case is compared at bf16's tolerance. train.precision=bf16 (autocast)
and bf16-true (bf16 weights) in one process: close to fp32."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._inductor.config

from moe_vae.errors import MoeVaeError


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled frames shared with other tests (the model's) would be recompiled with dynamic
    shapes, which inductor's eager-random fallback cannot draw: start from a clean cache."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "routing,gemm,fused,noise",
    [
        ("dense", "batched", False, "none"),
        ("dense", "batched", True, "none"),
        ("topk", "batched", False, "none"),
        ("topk", "batched", False, "gumbel"),
        ("topk", "grouped", False, "none"),
    ],
)
def test_compiled_step_matches_eager(train_steps, weights_agree, routing, gemm, fused, noise):
    def losses(mode: str, sync: str) -> tuple[list[float], dict[str, torch.Tensor]]:
        return train_steps(
            f"{mode}-{routing}-{gemm}-{fused}-{noise}",
            f"--model.routing={routing}",
            f"--model.route_noise={noise}",
            f"--model.expert_gemm={gemm}",
            f"--model.fused_input={str(fused).lower()}",
            f"--train.compile={mode}",
            f"--train.host_sync={sync}",
            # grouped: the layout (and with it the rows' random draws) depends on the GEMM's
            # dtype, which differs compiled (bf16) and eager (fp32)
            fixed_noise=True,
        )

    eager, w_eager = losses("none", "step")
    # Inductor draws its own random numbers unless told to use eager's: same noise, same math.
    # The fast path as a GPU runs it: compiled, and the update checked on the device.
    with torch._inductor.config.patch(fallback_random=True):
        compiled, w_compiled = losses("default", "log")
    # Grouped: bf16 compiled. Adam's updates of near-0 gradients may flip: weights_agree.
    # (tests/unit/test_grouped.py compares the compiled bf16 gradients themselves.)
    rel = 1e-4 if gemm == "batched" else 1e-2
    assert len(eager) == 4
    assert compiled == pytest.approx(eager, rel=rel)
    # Dense: every weight within 1e-4.
    weights_agree(w_compiled, w_eager, adam_steps=4, share=0.0 if routing == "dense" else 5e-3)


# Labels (30 %) and the warm start's pseudo-labels, its weight held for epoch 1, halved in
# epoch 2 and 0 in epoch 3: the recorded step reads it from a device scalar set each epoch.
TARGETS = [
    "--model.num_experts=10",  # label c asks for expert c
    "--loss.label_fraction=0.3",
    "--warm_start.method=cluster",
    "--warm_start.weight=10",
    "--warm_start.hold_epochs=1",
    "--warm_start.decay_epochs=1",
    "--train.epochs=3",
]


@pytest.mark.parametrize(
    "case,extra,steps",
    [
        ("dense", ["--model.routing=dense"], 12),
        ("topk", ["--model.routing=topk"], 12),
        ("topk-gumbel", ["--model.routing=topk", "--model.route_noise=gumbel"], 12),
        ("bf16-true", ["--train.precision=bf16-true"], 12),
        ("targets", TARGETS, 30),
    ],
)
def test_cuda_graph_step_is_the_same_step(train_steps, case, extra, steps):
    """train.cuda_graph's step (batch gathered on the device from the epoch's plan, labels and
    pseudo-labels from per-sample tables, the sums kept inside the step) is the plain
    host_sync=log step, exactly: 12 steps cross the tiny config's epoch of 10. On a CPU no
    graph is recorded; tests/gpu records one."""
    extra = [*extra, "--train.host_sync=log"]
    plain, w_plain = train_steps(f"plain-{case}", *extra, steps=steps)
    graph, w_graph = train_steps(f"graph-{case}", *extra, "--train.cuda_graph=true", steps=steps)
    assert len(plain) == steps
    assert graph == plain
    for name, w in w_plain.items():
        torch.testing.assert_close(w_graph[name], w, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("routing", ["dense", "topk"])
def test_bf16_in_one_process(train_steps, routing):
    """bf16 (autocast): bf16 matmuls, fp32 weights. bf16-true: the weights themselves (so the
    gradients and Adam's moments) in bf16. Both close to fp32 over 4 steps; top-k's routing
    reads the manager's logits in fp32 either way."""
    extra = [f"--model.routing={routing}", "--model.route_noise=none"]
    fp32, w32 = train_steps(f"fp32-{routing}", *extra)
    bf16, w16 = train_steps(f"bf16-{routing}", *extra, "--train.precision=bf16")
    with pytest.warns(UserWarning, match="set train.compile=default"):  # eager is slow
        true, wt = train_steps(f"bf16-true-{routing}", *extra, "--train.precision=bf16-true")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nearest, wn = train_steps(
            f"bf16-nearest-{routing}",
            *extra,
            "--train.precision=bf16-true",
            "--optim.bf16_rounding=nearest",  # torch's fused Adam over bf16 weights
        )
    assert not [w for w in caught if "train.compile" in str(w.message)]  # fused: no hint
    assert bf16 != fp32 and true != fp32  # the matmuls really ran in bf16
    assert true != nearest  # two ways of rounding the update
    for losses in (bf16, true, nearest):
        assert losses == pytest.approx(fp32, rel=2e-2)
    for name, w in w32.items():
        assert w16[name].dtype == torch.float32, name  # fp32 weights: Adam updates them
        torch.testing.assert_close(w16[name], w, rtol=0, atol=8e-3, msg=name)  # 4 steps of lr
        for w_bf16 in (wt[name], wn[name]):
            assert w_bf16.dtype == torch.bfloat16, name  # stored in bf16
            # 4 steps of lr, plus the weight's own rounding (up to 2^-8 of its size)
            torch.testing.assert_close(w_bf16.float(), w, rtol=2**-8, atol=8e-3, msg=name)


def test_fp16_needs_deepspeed(train_steps):
    with pytest.raises(MoeVaeError, match="fp16 needs loss scaling"):
        train_steps("fp16", "--train.precision=fp16")
