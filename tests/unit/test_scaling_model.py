"""The multi-GPU model on paper (benchmarks/scaling_model.py): its traffic against what the
real all-to-all dispatcher sends, and the trends its table and crossover rest on."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import moe_vae.parallel.dispatch as parallel_dispatch
from moe_vae.config import load_config
from moe_vae.model.dispatch import capacity, pack, plan_slots
from moe_vae.model.experts import MLPExpertBank
from moe_vae.model.manager import Manager

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "scaling_model.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("scaling_model", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


sm = _load_script()


class RecordingDist:
    """torch.distributed for one process posing as rank 0 of a group: every collective copies
    this rank's data (as if all ranks sent the same) and records its send buffer's bytes."""

    ReduceOp = torch.distributed.ReduceOp

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, bool]] = []
        self.backward = False

    def _record(self, kind: str, t: torch.Tensor) -> None:
        self.sent.append((kind, t.numel() * t.element_size(), self.backward))

    def all_to_all_single(self, out, x, group=None):
        self._record("all_to_all", x)
        out.copy_(x)

    def all_gather(self, parts, x, group=None):
        self._record("all_gather", x)
        for part in parts:
            part.copy_(x)

    def get_rank(self) -> int:
        return 0


def _real_traffic(monkeypatch, routing: str, G: int, E: int, B: int, D: int, cf: float):
    fake = RecordingDist()
    monkeypatch.setattr(parallel_dispatch, "dist", fake)
    dispatcher = parallel_dispatch.AllToAllDispatcher(None, list(range(G)))  # type: ignore[arg-type]
    w_E = torch.ones(E // G, requires_grad=True)  # stands in for the experts' weights

    def local_losses(x: torch.Tensor, ids: torch.Tensor, groups=None) -> torch.Tensor:
        return x.sum(-1) * w_E[:, None]  # [E_l, N]; groups: grouped GEMM, not used here

    x_BD = torch.rand(B, D)
    if routing == "dense":
        loss = dispatcher.expert_losses(x_BD, local_losses)
    else:
        idx_BK = torch.randint(0, E, (B, 1), generator=torch.Generator().manual_seed(0))
        loss, _ = dispatcher.expert_losses_topk(x_BD, idx_BK, local_losses, E, cf)
    fake.backward = True
    loss.sum().backward()
    return fake.sent


@pytest.mark.parametrize("routing", ["dense", "topk"])
@pytest.mark.parametrize(("G", "E", "B"), [(2, 4, 6), (4, 8, 5), (4, 16, 32)])
def test_modelled_collectives_are_what_the_dispatcher_sends(monkeypatch, routing, G, E, B):
    D, cf = 5, 1.25
    a = sm.parse(["--input-dim", str(D), "--capacity-factor", str(cf)])
    modelled = sm.dispatch_buffers(a, routing, G, E, B)
    assert modelled == _real_traffic(monkeypatch, routing, G, E, B, D, cf)


def test_capacity_and_pack_shape_match_the_model():
    for tokens, k, E, cf in [(4096, 1, 64, 1.25), (4096, 2, 4096, 1.25), (7, 1, 3, 1.0)]:
        assert sm.capacity(tokens, k, E, cf) == capacity(tokens, k, E, cf)
    B, E, D = 10, 4, 3
    idx_BK = torch.randint(0, E, (B, 1), generator=torch.Generator().manual_seed(1))
    slot_P, _ = plan_slots(idx_BK, E)
    cap = capacity(B, 1, E, 1.25)
    x_ECD, _, _ = pack(torch.rand(B, D), idx_BK, slot_P, cap, E)
    a = sm.parse(["--input-dim", str(D)])
    assert sm.dispatch_buffers(a, "topk", 2, E, B)[0][1] == x_ECD.numel() * 4


def test_dense_volume_grows_with_the_group_topk_does_not():
    a = sm.parse([])
    E, B = 256, 4096

    def sent(routing, P, batch=B):
        return sm.step(a, routing, P, E, P, batch).dispatch_bytes

    for P in (8, 64, 256):
        assert sent("dense", P, 2 * B) == 2 * sent("dense", P)
        # every rank receives the group's P*B inputs: at least (P-1)*B*D*4 bytes go out
        assert sent("dense", P) >= (P - 1) * B * a.input_dim * 4
    assert sent("dense", 256) > 30 * sent("dense", 8)
    assert sent("topk", 256) < 1.2 * sent("topk", 8)


def test_parameter_counts_are_those_of_the_real_modules():
    cfg = load_config(REPO / "configs" / "many_experts.yaml").model
    a = sm.parse([])  # the defaults are many_experts.yaml's shapes
    for field in ("z_dim", "encoder_layers", "decoder_layers", "manager_layers"):
        assert getattr(a, field) == getattr(cfg, field)
    bank = MLPExpertBank(cfg, a.input_dim, num_experts=3)
    assert sum(p.numel() for p in bank.parameters()) == 3 * sm.expert_mlp(a)[1]
    manager = Manager(a.input_dim, cfg.manager_layers, 256, cfg.activation)
    assert sum(p.numel() for p in manager.parameters()) == sm.manager_mlp(a, 256)[1]


def test_expert_state_memory_divides_by_the_expert_parallel_size():
    def per_param(zero: int, reps: int) -> float:  # weight; gradient split by ZeRO 2; m, v by 1
        return 4 + 4 / (reps if zero >= 2 else 1) + 8 / (reps if zero >= 1 else 1)

    gpus, E = 64, 1024
    for zero in (0, 1, 2):
        a = sm.parse(["--zero", str(zero)])
        manager = sm.manager_mlp(a, E)[1] * per_param(zero, gpus)
        for P in (1, 8, 64):
            experts = E // P * sm.expert_mlp(a)[1] * per_param(zero, gpus // P)
            got = sm.step(a, "topk", gpus, E, P, 4096).state_bytes
            assert got == pytest.approx(manager + experts)
    a = sm.parse([])
    dense = [sm.step(a, "dense", gpus, E, P, 4096) for P in (1, 8, 64)]
    assert len({s.compute_s for s in dense}) == 1  # E*B pairs per GPU whatever P is


def test_calibration_recovers_the_rate_it_was_given():
    a = sm.parse(["--achieved-tflops", "7", "--topk-efficiency", "0.3"])
    dense = sm.step(a, "dense", 1, a.ref_experts, 1, a.batch)
    topk = sm.step(a, "topk", 1, a.ref_experts, 1, a.batch)
    dense_sps, topk_sps = a.batch / dense.seconds, a.batch / topk.seconds
    b = sm.parse(["--ref-samples-per-s", str(dense_sps), "--ref-topk-samples-per-s", str(topk_sps)])
    assert b.rate == pytest.approx(7e12) and b.eff == pytest.approx(0.3)


def test_fixed_costs_come_from_two_batch_sizes():
    """Steps at two batch sizes give the fixed cost per step (the suite's graph runs have
    little launch overhead, which the assumed 0.3 + 0.2 ms would have charged them); the rate
    and efficiency then calibrate on top of it."""
    truth = ["--overhead-ms", "0.05", "--topk-overhead-ms", "0.03"]
    a = sm.parse([*truth, "--achieved-tflops", "7", "--topk-efficiency", "0.3"])
    sps = {
        (routing, B): B / sm.step(a, routing, 1, a.ref_experts, 1, B).seconds
        for routing in ("dense", "topk")
        for B in (a.batch, 1024)
    }
    b = sm.parse(
        [
            *("--ref-samples-per-s", str(sps["dense", a.batch])),
            *("--ref-topk-samples-per-s", str(sps["topk", a.batch])),
            *("--ref-small-batch", "1024"),
            *("--ref-small-samples-per-s", str(sps["dense", 1024])),
            *("--ref-small-topk-samples-per-s", str(sps["topk", 1024])),
        ]
    )
    assert b.overhead_ms == pytest.approx(0.05) and b.topk_overhead_ms == pytest.approx(0.03)
    assert b.rate == pytest.approx(7e12) and b.eff == pytest.approx(0.3)
    with pytest.raises(SystemExit, match="below the modelled weight traffic"):
        sm.parse(
            [
                *("--ref-samples-per-s", str(sps["dense", a.batch])),
                *("--ref-small-batch", "1024"),
                *("--ref-small-samples-per-s", str(sps["dense", a.batch])),  # no fixed part
            ]
        )


def test_crossover_exists_and_moves_with_batch_and_topk_cost():
    a = sm.parse([])
    found = {B: sm.crossover(a, 64, B) for B in (256, 4096)}
    assert all(found.values())
    E, dense, topk = found[4096]
    assert dense.seconds > topk.seconds
    half = [sm.best_step(a, r, 64, E // 2, 4096) for r in ("dense", "topk")]
    assert half[0].seconds <= half[1].seconds  # the first E where top-k wins
    # a small batch cannot amortise top-k's fixed costs: dense keeps paying to more experts
    assert found[256][0] > found[4096][0]
    slow_topk = sm.crossover(sm.parse(["--topk-efficiency", "0.1"]), 64, 4096)
    assert slow_topk is not None and slow_topk[0] > E


def test_main_prints_the_table_and_the_crossover(capsys):
    sm.main(["--gpus", "8", "64", "--experts", "64", "4096", "--crossover-batches", "4096"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 8 |")]
    assert len(rows) == 4 and "(does not fit)" in out  # dense at 4096 experts
    assert "ASSUMED" in out and "Crossover" in out
