"""The DeepSpeed dict: our config owns batch, optimizer, precision and clipping."""

import json

import pytest
import torch

from moe_vae.config import load_config
from moe_vae.errors import MoeVaeError
from moe_vae.parallel.engine import deepspeed_dict, load_knobs


def test_values_come_from_our_config(repo):
    cfg = load_config(None, ["--train.batch_size=96", "--optim.grad_clip=0"])
    knobs = load_knobs(str(repo / "configs" / "deepspeed" / "zero2.json"))
    ds = deepspeed_dict(cfg, 4, knobs)
    assert ds["train_batch_size"] == 96 and ds["train_micro_batch_size_per_gpu"] == 24
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 0  # explicit: DeepSpeed would clip at 1.0 by default
    assert ds["zero_optimization"]["stage"] == 2
    assert "bf16" not in ds and "fp16" not in ds
    cfg = load_config(None, ["--optim.grad_clip=2.5", "--train.precision=bf16"])
    ds = deepspeed_dict(cfg, 4, knobs)
    assert ds["gradient_clipping"] == 2.5 and ds["bf16"] == {"enabled": True}
    # ZeRO 0: DeepSpeed's norm is wrong with expert shards; the trainer clips instead.
    assert deepspeed_dict(cfg, 1, load_knobs(None))["gradient_clipping"] == 0


def test_shipped_knob_files_hold_engine_knobs_only(repo):
    for path in sorted((repo / "configs" / "deepspeed").glob("*.json")):
        load_knobs(str(path))


@pytest.mark.parametrize(
    ("knobs", "expected"),
    [
        ({"train_batch_size": 8}, r"train_batch_size \(owned by train\.batch_size\)"),
        (
            {"optimizer": {"type": "Adam"}, "bf16": {"enabled": True}},
            r"optimizer \(owned by optim\.\*\), bf16\.enabled \(owned by train\.precision\)",
        ),
        ({"fp16": True}, r"fp16 must be an object of engine knobs"),
        ({"zero_optimization": 1}, r"zero_optimization must be an object"),
        ({"bfloat16": {"enabled": True}}, r"bfloat16 \(owned by train\.precision\)"),
        ({"gradient_clipping": 1.0}, r"owned by optim\.grad_clip"),
        ({"zero_optimization": {"stage": 3}}, r"ZeRO stage 3 is not supported"),
    ],
)
def test_bad_knob_files(tmp_path, knobs, expected):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(knobs))
    with pytest.raises(MoeVaeError, match=expected):
        load_knobs(str(path))


def test_missing_or_broken_knob_file(tmp_path):
    with pytest.raises(MoeVaeError, match="not found"):
        load_knobs(str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MoeVaeError, match="not valid JSON"):
        load_knobs(str(tmp_path / "bad.json"))
    with pytest.raises(MoeVaeError, match="cannot be read as a JSON file"):
        load_knobs(str(tmp_path))  # a directory


def test_precision_sections_are_engine_knobs(tmp_path):
    """fp16's loss-scaling knobs come from the JSON; whether fp16 is on, from train.precision."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, "fp16": {"hysteresis": 4}}))
    knobs = load_knobs(str(path))
    ds = deepspeed_dict(load_config(None, ["--train.precision=fp16"]), 2, knobs)
    assert ds["fp16"] == {"hysteresis": 4, "enabled": True}
    with pytest.raises(MoeVaeError, match=r"sets fp16 knobs, but train\.precision=bf16"):
        deepspeed_dict(load_config(None, ["--train.precision=bf16"]), 2, knobs)


def test_fp16_under_zero_0_is_refused():
    """DeepSpeed's ZeRO 0 fp16 path never scales the loss but unscales the gradients."""
    cfg = load_config(None, ["--train.precision=fp16"])
    with pytest.raises(MoeVaeError, match=r"ZeRO stage 0.*DeepSpeed#8393.*ZeRO 1 or 2"):
        deepspeed_dict(cfg, 2, load_knobs(None))


def test_batch_must_split_evenly():
    with pytest.raises(MoeVaeError, match=r"train\.batch_size=100 \(global\) must divide evenly"):
        deepspeed_dict(load_config(None), 3, load_knobs(None))


def test_bf16_true_is_the_plain_engines():
    cfg = load_config(None, ["--train.precision=bf16-true"])
    with pytest.raises(MoeVaeError, match=r"bf16-true is for one process.*train\.precision=bf16"):
        deepspeed_dict(cfg, 2, load_knobs(None))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's refusal")
def test_fp16_on_cpu_is_refused_before_deepspeed_starts():
    """bf16 runs on CPU under DeepSpeed (tests/distributed); fp16 there is one clear error."""
    from moe_vae.model.mixture import MixtureOfVAEs
    from moe_vae.parallel.engine import build_engine

    cfg = load_config(None, ["--train.precision=fp16"])
    model = MixtureOfVAEs(cfg.model, (1, 28, 28))
    with pytest.raises(MoeVaeError, match=r"fp16: DeepSpeed's cpu accelerator has no fp16"):
        build_engine(model, cfg, 1)


def test_an_optimizer_wrapper_we_cannot_checkpoint_is_refused():
    """DeepSpeed picks its optimizer wrapper from the knobs; one whose state the checkpoint
    would leave out fails at start-up, naming itself, rather than at a resume."""
    from moe_vae.parallel.sharding import check_checkpointable

    class NewDeepSpeedWrapper:  # none of the attributes the known wrappers keep their state in
        def __init__(self, optim):
            self.optimizer = optim

    adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))])
    check_checkpointable(adam)  # torch's own: fine
    with pytest.raises(MoeVaeError, match=r"NewDeepSpeedWrapper.*cannot checkpoint.*knobs"):
        check_checkpointable(NewDeepSpeedWrapper(adam))


def test_only_a_dynamic_loss_scale_above_its_floor_absorbs_an_overflow():
    """DeepSpeed's own scalers on a ZeRO-like fp16 optimizer: a dynamic scale lowers itself
    (the skip is the scaler's); a static one never moves and a dynamic one at its floor cannot,
    so those overflows are failed steps (max_nonfinite_in_row stops the run, not DeepSpeed's
    bare exception at the floor)."""
    from types import SimpleNamespace

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

    from moe_vae.parallel.loss_scale import absorbs_overflow, keep_running_at_the_floor

    dynamic = DynamicLossScaler(
        init_scale=2.0**16,
        scale_window=1000,
        min_scale=1.0,
        delayed_shift=2,
        consecutive_hysteresis=False,
    )
    optim = SimpleNamespace(dtype=torch.float16, loss_scaler=dynamic)
    assert absorbs_overflow(optim)
    dynamic.cur_scale = 1.0
    assert not absorbs_overflow(optim)
    keep_running_at_the_floor(optim)
    assert dynamic.raise_error_at_min_scale is False
    static = SimpleNamespace(dtype=torch.float16, loss_scaler=LossScaler(scale=1024.0))
    assert not absorbs_overflow(static)
    bf16 = SimpleNamespace(dtype=torch.bfloat16, loss_scaler=LossScaler(scale=1.0))
    assert not absorbs_overflow(bf16)
