"""One rank of a non-finite-step run (started by the real `deepspeed` launcher).

Trains configs/tiny.yaml on 2 ranks. Faults on rank 1 only: at step 3 its loss is NaN, at step 5
one manager gradient is NaN (the loss stays finite). Checks on every rank: both steps were skipped
everywhere (weights bit-identical across each), the count is 2, every weight is finite, and the
replicated manager weights are the same on both ranks at the end. Rank 0 writes a JSON report.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.distributed as dist

from moe_vae.config import load_config
from moe_vae.parallel.dist import exit_process
from moe_vae.train.trainer import Trainer

NAN_LOSS_STEP, NAN_GRAD_STEP = 3, 5


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", type=int, default=0)  # set by the deepspeed launcher
    ap.add_argument("--zero-config", required=True)
    ap.add_argument("--outdir", required=True)
    args = ap.parse_args()
    cfg = load_config(
        "configs/tiny.yaml",
        [
            f"--output.dir={args.outdir}",
            "--output.name=nan",
            "--track.wandb=disabled",
            "--train.max_steps=8",
            "--train.log_every=1",
            "--parallel.engine=deepspeed",
            f"--parallel.deepspeed_config={args.zero_config}",
        ],
    )
    trainer = Trainer(cfg, quiet=True)
    rank = trainer.par.info.rank
    losses = trainer.model.losses

    def faulty(x, loss_cfg, generator=None, **options):
        routed = losses(x, loss_cfg, generator, **options)
        step = trainer.step + 1
        if rank == 1 and step == NAN_LOSS_STEP:
            routed.loss_BE = routed.loss_BE * float("nan")
        if rank == 1 and step == NAN_GRAD_STEP:
            routed.logits_BE.register_hook(lambda g: g * float("nan"))
        return routed

    trainer.model.losses = faulty  # type: ignore[method-assign]
    unchanged: dict[int, bool] = {}
    step_fn = trainer.train_step

    def recording(x, *rest):
        before = [p.detach().clone() for p in trainer.model.parameters()]
        out = step_fn(x, *rest)
        after = list(trainer.model.parameters())
        unchanged[trainer.step + 1] = all(
            torch.equal(a, b) for a, b in zip(before, after, strict=True)
        )
        return out

    trainer.train_step = recording  # type: ignore[method-assign]
    result = trainer.fit()
    manager = torch.cat([p.detach().flatten() for p in trainer.model.manager.parameters()])
    both = [torch.zeros_like(manager) for _ in range(2)]
    dist.all_gather(both, manager)
    report = {
        "skipped": result.epochs[-1]["train/nonfinite_skipped"] if result.epochs else None,
        "unchanged": unchanged,
        "finite": all(torch.isfinite(p).all().item() for p in trainer.model.parameters()),
        "manager_same": torch.equal(both[0], both[1]),
    }
    ok = (
        report["skipped"] == 2
        and unchanged[NAN_LOSS_STEP]
        and unchanged[NAN_GRAD_STEP]
        and not unchanged[NAN_GRAD_STEP + 1]
        and report["finite"]
        and report["manager_same"]
    )
    report["ok"] = ok
    print(f"rank {rank}: {report}", flush=True)
    if rank == 0:
        with open(f"{args.outdir}/report.json", "w") as f:
            json.dump(report, f)
    trainer.par.shutdown()
    exit_process(0 if ok else 1)


if __name__ == "__main__":
    sys.exit(main())
