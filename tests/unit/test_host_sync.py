"""train.host_sync=log promises a training step that never waits for the host. On a GPU an op
that reads a value back (`.item()`, a data-sized output such as bincount or boolean indexing)
stalls the step until the device catches up. CPU has no such wait, but the ops show in the
profiler just the same: no step may call one."""

from __future__ import annotations

import pytest
from torch.profiler import ProfilerActivity, profile

from moe_vae.config import load_config
from moe_vae.evaluate.evaluator import to_inputs
from moe_vae.train.trainer import Trainer

# Ops whose output size or value the host must read: _local_scalar_dense is .item()/.tolist()
# underneath, nonzero is boolean-mask indexing; the others size their output from the data.
# lift_fresh is torch.tensor(python data): on a GPU a blocking copy from the host.
SYNCING_OPS = {
    "aten::lift_fresh",
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::nonzero",
    "aten::masked_select",
    "aten::bincount",
    "aten::unique",
    "aten::_unique2",
    "aten::one_hot",
    "aten::repeat_interleave",
}
# Ops whose CPU kernels read a scalar back (fused Adam reads found_inf and lr per tensor, var
# over all elements returns through a host double, grouped_mm's CPU loop reads the group
# offsets); their CUDA kernels read nothing back.
CPU_KERNEL_READS = {"aten::_fused_adam_", "aten::var", "aten::_grouped_mm"}


def _syncing(events) -> list[str]:
    """The syncing ops among `events`, each with its caller chain, except inside the CPU
    kernels above."""
    found = []
    for event in events:
        if event.name not in SYNCING_OPS:
            continue
        chain, parent = [event.name], event.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        if CPU_KERNEL_READS.isdisjoint(chain):
            found.append(" <- ".join(chain[:4]))
    return found


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--model.fused_input=true"],
        ["--model.routing=topk", "--model.top_k=2"],
        ["--model.routing=topk", "--model.top_k=2", "--model.expert_gemm=grouped"],
        ["--model.routing=topk", "--model.route_noise=gumbel"],
        ["--optim.grad_clip=1.0"],
        ["--train.precision=bf16-true"],
    ],
    ids=["dense", "fused-input", "topk", "topk-grouped", "topk-gumbel", "grad-clip", "bf16-true"],
)
def test_deferred_step_calls_no_syncing_op(tmp_path, monkeypatch, repo, extra):
    monkeypatch.chdir(repo)
    cfg = load_config(
        "configs/tiny.yaml",
        [f"--output.dir={tmp_path}", "--train.host_sync=log", "--track.wandb=disabled", *extra],
    )
    trainer = Trainer(cfg, quiet=True)
    batches = trainer.data.train.epoch_batches(1)
    inputs = [to_inputs(next(batches).images) for _ in range(3)]
    trainer.train_step(inputs[0])  # the first step allocates Adam's state
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for x_BD in inputs[1:]:
            trainer.train_step(x_BD)
    names = {event.name for event in prof.events()}
    assert "aten::addmm" in names or "aten::baddbmm" in names  # the profiler saw the step
    assert _syncing(prof.events()) == []


def test_dropless_topk_is_seen_to_sync(tmp_path, monkeypatch, repo):
    """Dropless top-k sizes its expert blocks by the fullest expert, read back by definition:
    the check above sees that read."""
    monkeypatch.chdir(repo)
    cfg = load_config(
        "configs/tiny.yaml",
        [
            f"--output.dir={tmp_path}",
            "--train.host_sync=log",
            "--track.wandb=disabled",
            "--model.routing=topk",
            "--model.capacity_factor=0",
        ],
    )
    trainer = Trainer(cfg, quiet=True)
    x_BD = to_inputs(next(trainer.data.train.epoch_batches(1)).images)
    trainer.train_step(x_BD)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step(x_BD)
    assert any("_local_scalar_dense" in chain for chain in _syncing(prof.events()))
