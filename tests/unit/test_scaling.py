"""Many experts: memory per rank is proportional to the experts it holds."""

from pathlib import Path

import torch

from moe_vae.config import load_config
from moe_vae.model.mixture import MixtureOfVAEs

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "many_experts.yaml"


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_expert_parameters_scale_with_experts_per_rank():
    cfg = load_config(CONFIG).model
    assert cfg.num_experts >= 256
    full = MixtureOfVAEs(cfg, (1, 28, 28))
    per_expert = _count(full.experts) // cfg.num_experts
    for ep_size in (1, 2, 4, 8, 64):
        per_rank = cfg.num_experts // ep_size
        for shard in range(0, ep_size, max(1, ep_size // 2)):
            ids = range(shard * per_rank, (shard + 1) * per_rank)
            model = MixtureOfVAEs(cfg, (1, 28, 28), expert_ids=ids)
            assert _count(model.experts) == per_rank * per_expert
            assert _count(model.manager) == _count(full.manager)  # replicated, not sharded


def test_many_experts_train_steps(tmp_path, monkeypatch, repo):
    from moe_vae.train import train

    monkeypatch.chdir(repo)
    cfg = load_config(CONFIG, [f"--output.dir={tmp_path}", "--train.max_steps=4"])
    res = train(cfg, quiet=True)
    assert res.final_eval["steps"] == 4
    assert len(res.final_eval["cluster_sizes"]) == 256
    assert torch.isfinite(torch.tensor(res.epochs[-1]["loss/total"]))
