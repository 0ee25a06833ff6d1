"""train.compile on a CPU: the compiled step (what reduce-overhead turns into CUDA graphs on a
GPU) computes the same losses and weights as the eager step."""

from __future__ import annotations

import pytest
import torch
import torch._inductor.config

from moe_vae.config import load_config
from moe_vae.track.jsonl import step_values
from moe_vae.train.trainer import Trainer


@pytest.mark.timeout(600)
@pytest.mark.parametrize("routing", ["dense", "topk"])
def test_compiled_step_matches_eager(tmp_path, monkeypatch, repo, routing):
    monkeypatch.chdir(repo)

    def losses(mode: str) -> tuple[list[float], dict[str, torch.Tensor]]:
        cfg = load_config(
            "configs/tiny.yaml",
            [
                f"--output.dir={tmp_path}",
                f"--output.name={mode}-{routing}",
                f"--model.routing={routing}",
                f"--train.compile={mode}",
                "--train.max_steps=4",
                "--train.log_every=1",
            ],
        )
        trainer = Trainer(cfg, quiet=True)
        result = trainer.fit()
        values = step_values(result.run_dir / "metrics.jsonl")
        return [values[step] for step in sorted(values)], {
            k: v.detach().clone() for k, v in trainer.model.state_dict().items()
        }

    eager, w_eager = losses("none")
    # Inductor draws its own random numbers unless told to use eager's: same noise, same math.
    with torch._inductor.config.patch(fallback_random=True):
        compiled, w_compiled = losses("default")
    assert len(eager) == 4
    assert compiled == pytest.approx(eager, rel=1e-4)
    for name, w in w_eager.items():
        torch.testing.assert_close(w_compiled[name], w, rtol=1e-3, atol=1e-4, msg=name)
