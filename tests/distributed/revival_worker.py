"""One rank of a revival run (started by the real `deepspeed` launcher, see test_deepspeed.py).

Trains configs/tiny.yaml (4 experts) for a few steps on 2 ranks with expert parallelism (ep 2:
experts 0-1 on rank 0, 2-3 on rank 1) under the precision and DeepSpeed knobs given, then
revives expert 1 from expert 2 (a donor on the other rank) and expert 3 from expert 0. Reads
every parameter's state (fp32 master where the optimizer keeps one, Adam's moments) before and
after, and checks on every rank:
- outside the revived rows, every master weight and moment is bit-identical;
- a revived expert's moments are its donor's, its master the donor's within the perturbation;
- the manager's logit rows: the dead's are the donor's, the donor's bias down by log 2;
- the module's weights are the masters rounded to the module's dtype;
- a further training step runs and leaves every weight finite.
Rank 0 writes a JSON report to --out; any failed check exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import torch

from moe_vae.config import load_config
from moe_vae.parallel.dist import exit_process
from moe_vae.parallel.sharding import EXPERT_PREFIX, MASTER_KEY, local_optimizer_state
from moe_vae.train.revival import revive
from moe_vae.train.trainer import Trainer

PAIRS = [(1, 2), (3, 0)]  # (dead, donor)
NOISE = 0.01


def snapshot(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's master (the weight itself where there is no copy) and moments, with
    expert rows gathered from both ranks: {name: {key: tensor [rows, -1]}}."""
    get = local_optimizer_state(trainer.optim)
    model, par = trainer.model, trainer.par
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in model.named_parameters():
        entry = get(p)
        entry.setdefault(MASTER_KEY, p.detach())
        rows: dict[str, torch.Tensor] = {}
        for key, value in entry.items():
            if not (torch.is_tensor(value) and value.shape == p.shape):
                continue
            value = value.detach().float().clone()
            if name.startswith(EXPERT_PREFIX):
                value = par.gather_experts(value.reshape(len(model.expert_ids), -1))
            rows[key] = value.reshape(value.shape[0], -1)
        module = p.detach().float().clone()
        if name.startswith(EXPERT_PREFIX):
            module = par.gather_experts(module.reshape(len(model.expert_ids), -1))
        rows["module"] = module.reshape(module.shape[0], -1)
        out[name] = rows
    return out


def check(before: dict[str, Any], after: dict[str, Any], last: str, dtype: torch.dtype) -> list:
    """The failed checks, as (parameter, key, what) triples."""
    dead = [d for d, _ in PAIRS]
    failed = []
    for name, rows in after.items():
        expert = name.startswith(EXPERT_PREFIX)
        if not expert and not name.startswith(last):
            for key, value in rows.items():  # neither an expert nor a logit row: untouched
                if not torch.equal(value, before[name][key]):
                    failed.append((name, key, "changed"))
            continue
        # rows: experts, or the manager's logits (a row per expert)
        keep = [i for i in range(rows[MASTER_KEY].shape[0]) if i not in dead]
        for key, value in rows.items():
            old = before[name][key]
            # the donors of the logit bias lose log 2 each (expert 0 and 2 each give once)
            logit_bias_master = key == MASTER_KEY and name.endswith("bias") and not expert
            untouched = key != "module" and not logit_bias_master
            if untouched and not torch.equal(value[keep], old[keep]):
                failed.append((name, key, "untouched rows changed"))
            for d, donor in PAIRS:
                if key == "module":
                    continue
                if key != MASTER_KEY:
                    if not torch.equal(value[d], old[donor]):
                        failed.append((name, key, f"row {d} is not row {donor}'s"))
                elif expert:
                    gap = (value[d] - old[donor]).abs().max().item()
                    bound = NOISE * 6 * old[donor].abs().mean().item() + 1e-9
                    if not 0 < gap <= bound:
                        failed.append((name, key, f"row {d}: gap {gap} not in (0, {bound}]"))
                elif name.endswith("bias"):
                    want = old[donor] - math.log(2.0)
                    if not (
                        torch.allclose(value[donor], want) and torch.equal(value[d], value[donor])
                    ):
                        failed.append((name, key, f"bias rows {d}/{donor} not split"))
                elif not torch.equal(value[d], old[donor]):
                    failed.append((name, key, f"row {d} is not row {donor}'s"))
        if not torch.equal(rows["module"], rows[MASTER_KEY].to(dtype).float()):
            failed.append((name, "module", "not the master rounded"))
    return failed


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", type=int, default=0)  # set by the deepspeed launcher
    ap.add_argument("--ds-config", required=True)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--outdir", required=True)
    args = ap.parse_args()
    cfg = load_config(
        "configs/tiny.yaml",
        [
            f"--output.dir={args.outdir}",
            "--output.name=revive",
            "--track.wandb=disabled",
            "--train.max_steps=4",
            "--train.batch_size=100",
            f"--train.precision={args.precision}",
            "--parallel.engine=deepspeed",
            "--parallel.ep_size=2",
            f"--parallel.deepspeed_config={args.ds_config}",
        ],
    )
    trainer = Trainer(cfg, quiet=True)
    trainer.fit()
    model = trainer.model
    last = f"manager.layers.{len(model.manager.layers) - 1}."
    dtype = next(model.parameters()).dtype
    before = snapshot(trainer)
    revive(model, trainer.optim, trainer.par, PAIRS, noise=NOISE, seed=7)
    after = snapshot(trainer)
    failed = check(before, after, last, dtype)

    # One more step from the revived state, on a batch of this rank's size.
    x = torch.rand(cfg.train.batch_size // trainer.par.info.world_size, 784)
    _, stepped, _ = trainer.train_step(x.to(trainer.device))
    finite = all(torch.isfinite(p).all().item() for p in model.parameters())
    report = {"failed": failed[:20], "n_failed": len(failed), "stepped": stepped}
    report["ok"] = not failed and stepped and finite
    rank = trainer.par.info.rank
    print(f"rank {rank}: {report}", flush=True)
    if rank == 0:
        with open(f"{args.outdir}/report.json", "w") as f:
            json.dump(report, f)
    trainer.par.shutdown()
    exit_process(0 if report["ok"] else 1)


if __name__ == "__main__":
    sys.exit(main())
