"""The sampler whose proportions change inside a run (``DynamicMixIterator``).

Oracles: grain's own ``IterDataset.mix`` (today's fixed-mixture iterator,
``make_train_iterator``) for the unchanged case, and the requested
proportions themselves (long-run frequencies, per-batch counts) otherwise.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dograph_jax.data import (DynamicMixIterator, PackedDomains, integer_weights,
                              interleave_domain, make_train_iterator)

SIZES = (50, 7, 23, 31)


def _packed(sizes=SIZES, width=9) -> PackedDomains:
  rng = np.random.default_rng(0)
  names = [f"d{i}" for i in range(len(sizes))]
  # Row r of domain d starts with 1000 d + r: every row is identifiable.
  rows = []
  for d, n in enumerate(sizes):
    r = rng.integers(0, 100, (n, width)).astype(np.int32)
    r[:, 0] = 1000 * d + np.arange(n)
    rows.append(r)
  return PackedDomains(names=names, rows=rows, tokens_per_domain=[n * width for n in sizes],
                       seq_len=width - 1)


def _same(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(
      np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.parametrize("proportions", ["natural", "uniform",
                                         {"d0": 0.7, "d1": 0.05, "d2": 0.2, "d3": 0.05}])
@pytest.mark.parametrize("shard", [(0, 1), (1, 2)])
def test_unchanged_proportions_give_todays_batches(proportions, shard):
  packed = _packed()
  index, count = shard
  fixed = make_train_iterator(packed, 8, proportions=proportions, seed=3,
                              shard_index=index, shard_count=count)
  dynamic = DynamicMixIterator(packed, 8, proportions=proportions, seed=3,
                               shard_index=index, shard_count=count)
  for step in range(40):  # several epochs of the small domains
    if step % 7 == 3:  # re-setting the same proportions changes nothing
      dynamic.set_proportions(np.asarray(dynamic.weights) / sum(dynamic.weights))
    assert _same(next(fixed), next(dynamic)), step


def test_interleaving_holds_each_weight_per_period():
  rng = np.random.default_rng(1)
  for _ in range(20):
    weights = tuple(int(w) for w in rng.integers(0, 40, 5))
    if sum(weights) == 0:
      continue
    period = sum(weights)
    start = int(rng.integers(0, 10 * period))
    counts = np.bincount([interleave_domain(k, weights) for k in range(start, start + period)],
                         minlength=5)
    np.testing.assert_array_equal(counts, weights)


def test_integer_weights_follow_grains_scaling_and_reject_bad_input():
  assert integer_weights([0.2, 0.4, 0.4]) == (100, 200, 200)
  assert integer_weights([0.5, 0.0, 0.5]) == (100, 0, 100)
  assert integer_weights([1.0, 1e-9]) == (100, 0)  # negligible: never drawn
  for bad in ([np.nan, 1.0], [-0.1, 1.1], [0.0, 0.0], [np.inf, 1.0]):
    with pytest.raises(ValueError, match="finite, >= 0 and not all 0"):
      integer_weights(bad)


def test_changing_proportions_are_followed_without_bias():
  # Domains of a few hundred rows: grain's shuffle costs ~25 ms / N per row.
  packed = _packed(sizes=(600, 400, 500, 450))
  sampler = DynamicMixIterator(packed, 32, proportions="uniform", seed=0)
  target = np.array([0.5, 0.01, 0.3, 0.19])
  total = np.zeros(4)
  steps = 1500
  for step in range(steps):
    # A change every step (as a mixer's float32 proportions do): a new
    # segment of the interleaving every batch.
    p = target * (1.0 + 1e-3 * (step % 2))
    sampler.set_proportions(p)
    counts = np.bincount(next(sampler)["domain_id"], minlength=4)
    want = 32 * p / p.sum()
    assert np.all(np.abs(counts - want) < 2.0), (step, counts, want)
    total += counts
  # Unbiased: the frequencies are within 4 standard errors of a multinomial
  # (the draws are less variable than that) -- a restart at phase 0 every
  # batch would give the rare domain 1 row per batch (0.031, 3x too many).
  freq = total / total.sum()
  se = np.sqrt(target * (1 - target) / total.sum())
  assert np.all(np.abs(freq - target) < 4 * se), (freq, target)


def test_zero_proportion_is_never_drawn_and_mapping_form():
  sampler = DynamicMixIterator(_packed(), 16, proportions="uniform", seed=0)
  sampler.set_proportions({"d0": 0.0, "d1": 1.0, "d2": 0.0, "d3": 3.0})
  ids = np.concatenate([next(sampler)["domain_id"] for _ in range(20)])
  assert set(ids.tolist()) == {1, 3}
  assert abs((ids == 3).mean() - 0.75) < 0.05
  with pytest.raises(ValueError, match="domains are"):
    sampler.set_proportions({"d0": 1.0})
  with pytest.raises(ValueError, match="4 domains"):
    sampler.set_proportions([0.5, 0.5])
  with pytest.raises(ValueError, match="finite"):
    sampler.set_proportions([np.nan, 1.0, 1.0, 1.0])


def _schedule(step: int) -> np.ndarray:
  rng = np.random.default_rng(step // 3)  # proportions that change every 3 steps
  return rng.dirichlet(np.ones(4))


def test_resume_from_json_state_is_exact():
  packed = _packed()
  straight = DynamicMixIterator(packed, 8, proportions="natural", seed=5)
  expected = []
  for step in range(30):
    straight.set_proportions(_schedule(step))
    expected.append(next(straight))
  first = DynamicMixIterator(packed, 8, proportions="natural", seed=5)
  for step in range(13):
    first.set_proportions(_schedule(step))
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  resumed = DynamicMixIterator(packed, 8, proportions="natural", seed=5)
  resumed.set_state(state)
  for step in range(13, 30):
    resumed.set_proportions(_schedule(step))
    assert _same(next(resumed), expected[step]), step


def test_hosts_draw_equal_counts_of_disjoint_rows():
  packed = _packed(sizes=(40, 12, 24, 30))
  hosts = [DynamicMixIterator(packed, 16, proportions="uniform", seed=2, shard_index=i,
                              shard_count=2) for i in range(2)]
  for step in range(12):
    for h in hosts:
      h.set_proportions(_schedule(step))
    a, b = (next(h) for h in hosts)
    np.testing.assert_array_equal(np.bincount(a["domain_id"], minlength=4),
                                  np.bincount(b["domain_id"], minlength=4))
    assert a["tokens"].shape == (8, 9)
    # Within a step (no domain wraps an epoch here), no row is on both hosts.
    if step < 2:
      assert not set(a["tokens"][:, 0].tolist()) & set(b["tokens"][:, 0].tolist())


def test_state_of_another_corpus_is_refused():
  a = DynamicMixIterator(_packed(), 8, proportions="uniform", seed=0)
  b = DynamicMixIterator(_packed(sizes=(10, 10)), 8, proportions="uniform", seed=0)
  with pytest.raises(ValueError, match="2 domains"):
    a.set_state(b.get_state())
