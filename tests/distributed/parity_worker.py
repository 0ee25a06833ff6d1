"""One rank of a parity run (started by the real `deepspeed` launcher, see test_deepspeed.py).

Trains the mixture for a few steps through the project's distributed path (setup_parallel,
parallelize, the all-to-all dispatcher, the DeepSpeed engine with ZeRO) and, next to it on every
rank, the single-process model holding all experts on the whole global batch. Same initial
weights, same per-sample latent noise. Checks, on every rank:
- the global loss (mean over ranks) equals the single-process loss at every step;
- with ZeRO 0, every parameter's gradient after the first backward equals the single-process one;
- after the last step every parameter matches within tolerance.
Rank 0 writes the largest differences to --out as JSON; any mismatch exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from moe_vae.config import load_config
from moe_vae.model.losses import objective
from moe_vae.model.mixture import MixtureOfVAEs
from moe_vae.parallel.dist import exit_process
from moe_vae.parallel.engine import build_engine
from moe_vae.parallel.setup import parallelize, setup_parallel
from moe_vae.parallel.sharding import load_full_state_dict

SHAPE = (1, 4, 4)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", type=int, default=0)  # set by the deepspeed launcher
    ap.add_argument("--zero-config", required=True)
    ap.add_argument("--ep-size", type=int, default=0)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=0, help="0 = dense routing")
    ap.add_argument("--clip", type=float, default=0.0, help="optim.grad_clip (0: none)")
    ap.add_argument("--precision", default="fp32", help="train.precision: fp32 or bf16")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    B_global = 8
    overrides = [
        f"--model.num_experts={args.experts}",
        "--model.z_dim=3",
        "--model.encoder_layers=[6]",
        "--model.decoder_layers=[5]",
        "--model.manager_layers=[7]",
        "--train.seed=11",
        f"--train.batch_size={B_global}",
        "--parallel.engine=deepspeed",
        "--optim.lr=0.01",
        # With a tiny eps, Adam ignores the gradient's scale: a larger one makes a scaled
        # gradient (such as DeepSpeed's default clipping) show in the parameters.
        "--optim.eps=1e-3",
        f"--parallel.deepspeed_config={args.zero_config}",
        f"--optim.grad_clip={args.clip}",
        f"--train.precision={args.precision}",
    ]
    if args.ep_size:
        overrides.append(f"--parallel.ep_size={args.ep_size}")
    if args.top_k:  # dropless, so that drops cannot differ between 1 and N ranks
        overrides += [
            "--model.routing=topk",
            f"--model.top_k={args.top_k}",
            "--model.capacity_factor=0",
        ]
    cfg = load_config(None, overrides)
    par = setup_parallel(cfg)
    world, rank = par.info.world_size, par.info.rank
    B = B_global // world

    g = torch.Generator().manual_seed(5)
    x_all = torch.rand(args.steps, B_global, 16, generator=g)
    eps_table = torch.randn(args.steps, args.experts, B_global, 3, generator=g)
    step_box = [0]

    def noise(expert_ids, sample_ids, z_dim):
        # expert_ids [E_l, 1] with sample_ids [N] (dense) or [E_l, N] (top-k slots): same eps.
        return eps_table[step_box[0]][expert_ids, sample_ids]

    torch.manual_seed(0)
    ref = MixtureOfVAEs(cfg.model, SHAPE)
    ref.noise = noise
    ref_opt = torch.optim.Adam(ref.parameters(), lr=cfg.optim.lr, eps=cfg.optim.eps)

    model = MixtureOfVAEs(cfg.model, SHAPE, expert_ids=par.expert_ids)
    parallelize(model, par, cfg.train.seed)
    load_full_state_dict(model, ref.state_dict())
    ids = model.expert_ids
    model.noise = noise
    engine = build_engine(model, cfg, world)

    def full_param(name: str, p: torch.Tensor) -> torch.Tensor:
        if name.startswith("experts."):
            return par.gather_experts(p.detach().reshape(len(ids), -1)).reshape(-1, *p.shape[1:])
        return p.detach()

    report = {
        "loss_diff": 0.0,
        "grad_diff": 0.0,
        "param_diff": 0.0,
        "world": world,
        "ep": par.ep.size,
    }
    # bf16: DeepSpeed's bf16 weights and gradients against the fp32 reference (a few bf16
    # steps of 2^-8 relative); fp32: rounding alone.
    tol = dict(loss=1e-5, grad=1e-4, norm=1e-5, param=1e-4)
    if args.precision == "bf16":
        tol = dict(loss=2e-2, grad=5e-2, norm=2e-3, param=2e-2)
    ok = True
    for step in range(args.steps):
        step_box[0] = step
        x_r = x_all[step, rank * B : (rank + 1) * B]
        terms = objective(model.losses(x_r, cfg.loss), cfg.loss, par.sum_over_ranks)
        engine.backward(terms.total)

        ref_terms = objective(ref.losses(x_all[step], cfg.loss), cfg.loss)
        ref_opt.zero_grad()
        ref_terms.total.backward()

        global_loss = par.mean_over_ranks(terms.total.detach())
        diff = abs(global_loss.item() - ref_terms.total.item()) / abs(ref_terms.total.item())
        report["loss_diff"] = max(report["loss_diff"], diff)
        ok &= diff < tol["loss"]
        if step == 0 and engine.zero_optimization_stage() == 0:
            ref_params = dict(ref.named_parameters())
            for name, p in model.named_parameters():
                got = full_param(name, p.grad)
                want = ref_params[name].grad
                d = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
                report["grad_diff"] = max(report["grad_diff"], d)
                ok &= d < tol["grad"]
        if args.clip:  # small enough to bind: the norms here are ~0.5 to 1
            ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), args.clip)
            assert ref_norm > 2 * args.clip, f"clip {args.clip} does not bind (norm {ref_norm})"
            if engine.zero_optimization_stage() == 0:  # the trainer's clip (DeepSpeed's above)
                norm = par.clip_grad_norm(model, args.clip)
                d = abs(norm.item() - ref_norm.item()) / ref_norm.item()
                # bf16: from the same weights only (at step 0; bf16's updates then move them
                # apart, and the norms by a few %).
                if args.precision == "fp32" or step == 0:
                    report["norm_diff"] = max(report.get("norm_diff", 0.0), d)
                    ok &= d < tol["norm"]
        engine.step()
        ref_opt.step()

    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        got, want = full_param(name, p), ref_params[name].detach()
        d = (got - want).abs().max().item()
        report["param_diff"] = max(report["param_diff"], d)
        ok &= d < tol["param"]
    report["ok"] = bool(ok)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(report, f)
    print(f"rank {rank}: {report}", flush=True)
    par.shutdown()
    exit_process(0 if ok else 1)


if __name__ == "__main__":
    sys.exit(main())
