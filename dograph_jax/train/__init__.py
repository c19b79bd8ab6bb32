"""The trainer: configuration, methods, the jitted train step, the run loop,
checkpoints, trackers, offline pipelines and several-host helpers.

Needs the ``train`` extra (``pip install "dograph_jax[train]"``); the
transform alone (``import dograph_jax``) does not.

    from dograph_jax.train import TrainConfig, train
    summary = train(TrainConfig(method="uniform", steps=100))
"""

from dograph_jax.train.config import TrainConfig, parse_config
from dograph_jax.train.pretrain import train

__all__ = ["TrainConfig", "parse_config", "train"]
