"""The config tree. Defaults are the founding recipe (docs: model.md); configs/mnist_seed.yaml
states the same values explicitly and a test keeps the two equal.

Every section forbids unknown keys and validates strictly (no silent "3" -> 3 coercion), so a
typo or a wrong type is an error that names the key.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PositiveInt = Annotated[int, Field(ge=1)]
Activation = Literal["sigmoid", "relu", "tanh", "gelu", "silu", "elu", "leaky_relu"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class ModelConfig(Section):
    num_experts: PositiveInt = 10
    expert: Literal["mlp", "conv"] = "mlp"
    z_dim: PositiveInt = 10
    encoder_layers: list[PositiveInt] = Field(default_factory=lambda: [128])
    decoder_layers: list[PositiveInt] = Field(default_factory=lambda: [128])
    manager_layers: list[PositiveInt] = Field(default_factory=lambda: [128])
    activation: Activation = "sigmoid"
    # var = var_floor + exp(linear(h)): the floor keeps log(var) finite.
    var_floor: Annotated[float, Field(gt=0)] = 1e-5
    # Conv experts only: output channels of each stride-2 conv (the decoder mirrors them).
    conv_channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64])


class LossConfig(Section):
    likelihood: Literal["gaussian", "bernoulli"] = "gaussian"
    decoder_std: Annotated[float, Field(gt=0)] = 0.5
    # expected: mean_b Σ_i p_i L_i (the seed); mixture: mean_b −log Σ_i p_i exp(−L_i).
    objective: Literal["expected", "mixture"] = "expected"
    balancing_weight: Annotated[float, Field(ge=0)] = 0.1


class OptimConfig(Section):
    name: Literal["adam"] = "adam"
    lr: Annotated[float, Field(gt=0)] = 1e-3
    betas: list[Annotated[float, Field(ge=0, lt=1)]] = Field(
        default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2
    )
    eps: Annotated[float, Field(gt=0)] = 1e-8
    weight_decay: Annotated[float, Field(ge=0)] = 0.0


class TrainConfig(Section):
    epochs: PositiveInt = 100
    batch_size: PositiveInt = 100
    seed: Annotated[int, Field(ge=0)] = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Stop after this many optimizer steps (smoke tests); null = run every epoch to the end.
    max_steps: PositiveInt | None = None
    # A JSON line with the step's losses every this many steps.
    log_every: PositiveInt = 50
    # Drop the last incomplete batch so every step sees batch_size inputs (the seed's 600/epoch).
    drop_last: bool = True


class DataConfig(Section):
    name: Literal["mnist"] = "mnist"
    # embedded: the MNIST files shipped inside the package (works offline);
    # dir: IDX files (gz or raw) in `root`; download: fetch into `root` from `mirrors`, md5-checked.
    source: Literal["embedded", "dir", "download"] = "embedded"
    root: str | None = None
    mirrors: list[str] = Field(
        default_factory=lambda: [
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ]
    )
    verify_md5: bool = True
    # Use only the first N train / test samples (quick runs and tests); null = all.
    train_limit: PositiveInt | None = None
    test_limit: PositiveInt | None = None

    @model_validator(mode="after")
    def _root_when_needed(self) -> DataConfig:
        if self.source == "dir" and not self.root:
            raise ValueError("data.root must name a directory when data.source is 'dir'")
        return self


class EvalConfig(Section):
    batch_size: PositiveInt = 1000
    # Evaluate on the test split every N epochs (0 = only at the end of training).
    every_epochs: Annotated[int, Field(ge=0)] = 0
    # An expert is "in use" when it is the manager's argmax for at least this fraction of inputs.
    in_use_min_fraction: Annotated[float, Field(ge=0, le=1)] = 0.01


class OutputConfig(Section):
    dir: str = "runs"
    # Run directory name under `dir`; null = "<timestamp>".
    name: str | None = None
    # Refuse to write into a run directory that already holds outputs, unless true.
    overwrite: bool = False


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
