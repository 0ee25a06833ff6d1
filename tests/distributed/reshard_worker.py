"""One rank of a re-sharding check (started by the real `deepspeed` launcher).

Loads a training checkpoint (the whole model) on however many ranks this job has, each rank
keeping its expert shard, and writes the global loss on a fixed batch with fixed latent noise:
the same on 1, 2 or 4 ranks when the experts were re-sharded correctly.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import yaml

from moe_vae.config import Config
from moe_vae.model.losses import objective
from moe_vae.model.mixture import MixtureOfVAEs
from moe_vae.parallel.dist import exit_process
from moe_vae.parallel.setup import parallelize, setup_parallel
from moe_vae.parallel.sharding import load_full_state_dict
from moe_vae.train.checkpoint import load_checkpoint


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", type=int, default=0)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    ckpt = load_checkpoint(args.checkpoint)
    raw = yaml.safe_load(ckpt["config"])
    raw["parallel"] = {"engine": "deepspeed"}
    cfg = Config.model_validate(raw)
    par = setup_parallel(cfg)
    world, rank = par.info.world_size, par.info.rank
    shape = tuple(ckpt["image_shape"])
    model = MixtureOfVAEs(cfg.model, shape, expert_ids=par.expert_ids)
    parallelize(model, par, cfg.train.seed)
    load_full_state_dict(model, ckpt["model"])

    B_global, E, Z = 8, cfg.model.num_experts, cfg.model.z_dim
    g = torch.Generator().manual_seed(3)
    x = torch.rand(B_global, int(torch.tensor(shape).prod()), generator=g)
    eps = torch.randn(E, B_global, Z, generator=g)
    model.noise = lambda e, n, z: eps[e, n]
    B = B_global // world
    with torch.no_grad():
        terms = objective(
            model.losses(x[rank * B : (rank + 1) * B], cfg.loss), cfg.loss, par.sum_over_ranks
        )
    loss = par.mean_over_ranks(terms.total).item()
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"loss": loss, "world": world, "ep": par.ep.size}, f)
    par.shutdown()
    exit_process(0)


if __name__ == "__main__":
    sys.exit(main())
