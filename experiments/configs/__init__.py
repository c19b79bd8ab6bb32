"""Frozen dataclass configs for the experiments, with command-line overrides."""

from experiments.configs.pretrain import TrainConfig, parse_config

__all__ = ["TrainConfig", "parse_config"]
