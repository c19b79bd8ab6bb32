"""Temperature sampling (p_d ∝ n_d^(1/T), UniMax-style epoch cap) against
closed forms, and its place in the offline pipeline."""

import json
import math

import numpy as np
import pytest

from dograph_jax.data import write_synthetic_corpus
from dograph_jax.mixing.temperature import temperature_proportions
from dograph_jax.train import config, methods, pretrain, single_run


def test_closed_form_and_limits():
  sizes = [400.0, 100.0, 25.0]
  # T = 2: square roots 20, 10, 5 -> 20/35, 10/35, 5/35
  np.testing.assert_allclose(temperature_proportions(sizes, T=2.0),
                             [20 / 35, 10 / 35, 5 / 35], rtol=1e-12)
  # T = 1: natural proportions
  np.testing.assert_allclose(temperature_proportions(sizes, T=1.0),
                             np.asarray(sizes) / 525.0, rtol=1e-12)
  # T = 0.5: squares
  np.testing.assert_allclose(temperature_proportions(sizes, T=0.5),
                             np.asarray([160000, 10000, 625]) / 170625.0, rtol=1e-12)
  # large T -> uniform; T = inf is uniform exactly
  p = temperature_proportions(sizes, T=1e6)
  assert np.max(np.abs(p - 1 / 3)) < 1e-5
  np.testing.assert_array_equal(temperature_proportions(sizes, T=math.inf), [1 / 3] * 3)
  # no overflow at tiny T with large sizes: all mass on the largest domain
  np.testing.assert_allclose(temperature_proportions([1e12, 1e11], T=0.01), [1.0, 0.0],
                             atol=1e-12)


def test_epoch_cap_water_fills():
  sizes, budget = [400.0, 100.0, 25.0], 200.0
  # T = inf wants 1/3 each (66.7 rows); the cap of 1 epoch holds domain 2 to
  # 25 rows = 0.125, the rest (0.875) splits evenly between domains 0 and 1.
  p = temperature_proportions(sizes, T=math.inf, max_epochs=1.0, budget=budget)
  np.testing.assert_allclose(p, [0.4375, 0.4375, 0.125], rtol=1e-12)
  # Two rounds: sizes 100/40/10, budget 100, 1 epoch: caps 1 / 0.4 / 0.1.
  # Round 1 caps domain 2 (1/3 > 0.1) and splits 0.9 evenly (0.45 each);
  # round 2 caps domain 1 (0.45 > 0.4); domain 0 takes the rest, 0.5.
  p = temperature_proportions([100.0, 40.0, 10.0], T=math.inf, max_epochs=1.0, budget=100.0)
  np.testing.assert_allclose(p, [0.5, 0.4, 0.1], rtol=1e-12)
  # A cap that binds nowhere changes nothing.
  np.testing.assert_allclose(temperature_proportions(sizes, 2.0, 100.0, budget),
                             temperature_proportions(sizes, 2.0))


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="T must be > 0"):
    temperature_proportions([1.0, 2.0], T=0.0)
  with pytest.raises(ValueError, match="positive finite"):
    temperature_proportions([1.0, 0.0])
  with pytest.raises(ValueError, match="needs the run's budget"):
    temperature_proportions([1.0, 2.0], max_epochs=1.0)
  with pytest.raises(ValueError, match="repeated more than 1.0 times"):
    temperature_proportions([10.0, 20.0], max_epochs=1.0, budget=100.0)
  assert methods.parse_method_args("temperature", {"T": "2", "max_epochs": "3"}) == (
      {}, {"T": 2.0, "max_epochs": 3.0})
  with pytest.raises(ValueError, match="no argument 'budget'"):
    methods.parse_method_args("temperature", {"budget": "3"})


def test_pipeline_trains_at_the_temperature_mixture(tmp_path):
  corpus = write_synthetic_corpus(tmp_path / "corpus", seed=1, total_docs=300)
  cfg = config.make_config(data_dir=str(corpus), vocab_size=300, steps=3, batch_size=8, seq_len=32,
                    eval_every=0, eval_rows=4, save_every=0, warmup_steps=1, plots=False,
                    method="temperature", method_args={"T": "3.0"}, out_dir=str(tmp_path / "t"))
  summary = pretrain.train(cfg)
  rows = json.loads((tmp_path / "t" / "stages" / "final" / "summary.json").read_text())
  names = list(summary["mixture"])
  # The final run's sampling proportions are the closed form over its rows.
  data = single_run.load_data(config.replace(cfg, method="uniform", method_args={}))
  expected = np.asarray([data.rows[n] for n in names], np.float64) ** (1 / 3)
  np.testing.assert_allclose([summary["mixture"][n] for n in names],
                             expected / expected.sum(), rtol=1e-9)
  np.testing.assert_allclose([rows["proportions"][n] for n in names],
                             expected / expected.sum(), rtol=1e-9)
  assert summary["stages"].keys() == {"final"}
