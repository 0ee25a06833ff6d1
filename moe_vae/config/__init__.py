"""Typed configuration: one tree (schema.py), loaded from YAML with dotted overrides (load.py)."""

from moe_vae.config.load import ConfigError, config_to_yaml, load_config, parse_overrides
from moe_vae.config.schema import (
    Config,
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    ParallelConfig,
    TrackConfig,
    TrainConfig,
)

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "OutputConfig",
    "ParallelConfig",
    "TrackConfig",
    "TrainConfig",
    "config_to_yaml",
    "load_config",
    "parse_overrides",
]
