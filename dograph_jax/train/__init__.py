"""The trainer: configuration, methods, the jitted train step, the run loop,
checkpoints, trackers, offline pipelines and several-host helpers.

Needs the ``train`` extra (``pip install "dograph_jax[train]"``); the
transform alone (``import dograph_jax``) does not.

    from dograph_jax.train import make_config, train
    summary = train(make_config(method="uniform", steps=100))
"""

import importlib.util as _util

_missing = [m for m in ('tyro', 'grain', 'tokenizers') if _util.find_spec(m) is None]
if _missing:  # a clear message instead of an ImportError deep inside
  raise ImportError(f"dograph_jax.train needs the 'train' extra (missing: {', '.join(_missing)}): "
                    'pip install "dograph_jax[train]"')


from dograph_jax.train.config import TrainConfig, make_config, parse_config


def train(cfg: TrainConfig) -> dict:
  """Runs (or resumes) training: :func:`dograph_jax.train.pretrain.train`."""
  from dograph_jax.train import pretrain  # the loop's imports only when training
  return pretrain.train(cfg)


__all__ = ["TrainConfig", "make_config", "parse_config", "train"]
