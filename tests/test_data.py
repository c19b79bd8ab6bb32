"""Tokenizer, packing, mixing, resumable iteration and validation batches.

All data is made in tmp dirs from the synthetic corpus or small hand-made
domains; the tokenizer is trained here, offline.
"""

import json

import numpy as np
import pytest

from dograph_jax import data as dd
from dograph_jax.data import pipeline


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return dd.write_synthetic_corpus(tmp_path_factory.mktemp("corpus"), seed=0,
                                   total_docs=600)


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
  docs, _ = dd.read_split(corpus, "train")
  return dd.train_bpe_tokenizer((t for v in docs.values() for t in v),
                                tmp_path_factory.mktemp("tok"), vocab_size=512)


def _toy_packed(sizes=(40, 13, 5), seq_len=3):
  """Domains whose token values say where they come from: row r of domain d
  holds ``10**6 * d + 10 * r + k``.

  (Tests that draw many rows use domains of hundreds of rows or more: grain's
  index shuffle costs about 25 ms / N per row of an N-row domain.)
  """
  rows = []
  for d, n in enumerate(sizes):
    r = np.arange(n)[:, None] * 10 + np.arange(seq_len + 1)[None, :] + 10**6 * d
    rows.append(r.astype(np.int32))
  names = [f"d{d}" for d in range(len(sizes))]
  return dd.PackedDomains(names=names, rows=rows, seq_len=seq_len,
                          tokens_per_domain=[n * (seq_len + 1) for n in sizes])


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# --------------------------------------------------------------------------
# Tokenizer.


def test_tokenizer_train_save_load_round_trip(tokenizer, corpus, tmp_path,
                                              monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any download attempt would fail
  docs, _ = dd.read_split(corpus, "train")
  out = tmp_path / "tok"
  trained = dd.train_bpe_tokenizer((t for v in docs.values() for t in v), out,
                                   vocab_size=300, min_frequency=2)
  assert (out / "tokenizer.json").is_file()
  loaded = dd.load_tokenizer(out)
  assert len(loaded) == len(trained) == 300
  for tok in (trained, loaded):
    assert tok.eos_token == tok.bos_token == tok.pad_token == dd.EOS_TOKEN
    assert tok.eos_token_id == 0
  # Byte-level: any string, even one never seen, survives encode/decode.
  s = "The quiet river opened the gate. Ünïcödé ☃ 日本語 \t tabs  and  spaces"
  ids = loaded.encode(s, add_special_tokens=False)
  assert loaded.decode(ids) == s
  assert trained.encode(s, add_special_tokens=False) == ids
  # Merges were learnt: fewer tokens than bytes.
  prose = docs["prose"][0]
  assert len(loaded.encode(prose)) < 0.8 * len(prose.encode())

  with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
    dd.load_tokenizer(tmp_path / "no_such_tokenizer")


# --------------------------------------------------------------------------
# Packing.


def test_packing_reproduces_each_domains_stream(tokenizer, corpus):
  docs, _ = dd.read_split(corpus, "train")
  seq_len = 32
  packed = dd.pack_domains(docs, tokenizer, seq_len)
  eos = tokenizer.eos_token_id
  assert packed.names == list(docs) and packed.seq_len == seq_len
  for name, rows, n_tok in zip(packed.names, packed.rows,
                               packed.tokens_per_domain):
    expected = np.concatenate([
        np.asarray(tokenizer.encode(t, add_special_tokens=False) + [eos])
        for t in docs[name]])
    assert n_tok == expected.size
    assert rows.dtype == np.int32 and rows.shape == (n_tok // 33, 33)
    # Rows, in order, are the domain's own stream (so no row mixes domains)
    # and only the incomplete tail is dropped.
    np.testing.assert_array_equal(rows.reshape(-1),
                                  expected[:rows.size])
    assert expected.size - rows.size < seq_len + 1
    assert np.count_nonzero(expected == eos) == len(docs[name])


def test_literal_eos_text_is_not_a_document_boundary(tokenizer):
  docs = {"a": ["before <|endoftext|> after"] * 20}
  packed = dd.pack_domains(docs, tokenizer, 8)
  stream = packed.rows[0].reshape(-1)
  eos_at = np.flatnonzero(stream == tokenizer.eos_token_id)
  per_doc = packed.tokens_per_domain[0] // 20
  np.testing.assert_array_equal(eos_at, np.arange(1, eos_at.size + 1) * per_doc - 1)


def test_domain_too_small_for_one_row_is_named(tokenizer):
  with pytest.raises(ValueError, match="'tiny'"):
    dd.pack_domains({"big": ["word " * 500], "tiny": ["hi"]}, tokenizer, 64)


def test_packing_cache_hits_and_invalidates(tokenizer, corpus, tmp_path,
                                            monkeypatch):
  docs, _ = dd.read_split(corpus, "validation")
  first = dd.pack_domains_cached(docs, tokenizer, 16, tmp_path)
  entries = sorted(p.name for p in tmp_path.iterdir())
  assert len(entries) == 1 and entries[0].startswith("packed-")

  def fail(*args, **kwargs):
    raise AssertionError("pack_domains called on a cache hit")
  monkeypatch.setattr(pipeline, "pack_domains", fail)
  again = dd.pack_domains_cached(docs, tokenizer, 16, tmp_path)
  assert again.names == first.names
  assert again.tokens_per_domain == first.tokens_per_domain
  for a, b in zip(again.rows, first.rows):
    np.testing.assert_array_equal(a, b)
  monkeypatch.undo()

  # Any change of texts or seq_len is a different entry.
  changed = {k: list(v) for k, v in docs.items()}
  changed["code"][0] += " "
  k0 = dd.packing_cache_key(docs, tokenizer, 16)
  assert dd.packing_cache_key(changed, tokenizer, 16) != k0
  assert dd.packing_cache_key(docs, tokenizer, 17) != k0
  # Moving a document boundary changes the key too.
  moved = {k: list(v) for k, v in docs.items()}
  moved["code"][:2] = [moved["code"][0] + moved["code"][1][:1],
                       moved["code"][1][1:]]
  assert dd.packing_cache_key(moved, tokenizer, 16) != k0
  dd.pack_domains_cached(docs, tokenizer, 17, tmp_path)
  assert len(list(tmp_path.iterdir())) == 2


# --------------------------------------------------------------------------
# Proportions.


def test_natural_and_given_proportions():
  packed = _toy_packed()
  nat = dd.natural_proportions(packed)
  assert list(nat) == packed.names
  np.testing.assert_allclose(list(nat.values()), np.array([40, 13, 5]) / 58)
  assert dd.resolve_proportions(packed, "natural") == nat
  assert dd.resolve_proportions(packed, "uniform") == pytest.approx(
      {"d0": 1 / 3, "d1": 1 / 3, "d2": 1 / 3})
  got = dd.resolve_proportions(packed, {"d2": 1, "d0": 2, "d1": 1})
  assert list(got) == packed.names and got == {"d0": 0.5, "d1": 0.25,
                                               "d2": 0.25}


@pytest.mark.parametrize("bad, match", [
    ({"d0": 1, "d1": 1, "d2": 0}, "positive"),
    ({"d0": 1, "d1": 1, "d2": -1}, "positive"),
    ({"d0": 1, "d1": 1, "d2": float("nan")}, "positive"),
    ({"d0": 1, "d1": 1}, r"miss domain\(s\) \['d2'\]"),
    ({"d0": 1, "d1": 1, "d2": 1, "d9": 1}, r"unknown domain\(s\) \['d9'\]"),
    ("natrual", "natural"),
])
def test_bad_proportions_are_clear_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    dd.make_train_iterator(_toy_packed(), 4, proportions=bad, seed=0)


# --------------------------------------------------------------------------
# Training iterator.


def test_batches_have_the_contract_shapes_and_true_domain_ids():
  packed = _toy_packed()
  it = dd.make_train_iterator(packed, 8, proportions="uniform", seed=0)
  for batch in _take(it, 30):
    assert set(batch) == {"tokens", "domain_id"}
    assert batch["tokens"].shape == (8, 4) and batch["tokens"].dtype == np.int32
    assert batch["domain_id"].shape == (8,)
    assert batch["domain_id"].dtype == np.int32
    # Each row is a whole row of the domain it is labelled with.
    d = batch["domain_id"]
    np.testing.assert_array_equal(batch["tokens"][:, 0] // 10**6, d)
    np.testing.assert_array_equal(batch["tokens"] % 10, np.tile(np.arange(4), (8, 1)))


def test_each_epoch_of_a_domain_is_a_permutation_of_its_rows():
  packed = _toy_packed(sizes=(12, 7))
  it = dd.make_train_iterator(packed, 1, proportions="uniform", seed=5)
  seen = {0: [], 1: []}
  for batch in _take(it, 60):
    seen[int(batch["domain_id"][0])].append(int(batch["tokens"][0, 0]))
  for d, n in ((0, 12), (1, 7)):
    rows = [(t - 10**6 * d) // 10 for t in seen[d]]
    epochs = [rows[i:i + n] for i in range(0, len(rows) - n + 1, n)]
    assert len(epochs) >= 2
    for e in epochs:
      assert sorted(e) == list(range(n))
    assert epochs[0] != epochs[1]  # reshuffled each epoch


def test_empirical_domain_frequencies_match_proportions():
  """Over n = 4800 rows, each domain's frequency is within 4 binomial standard
  deviations, 4 * sqrt(p (1 - p) / n) (0.016 at p = 0.1), of its proportion.

  (grain's mix interleaves deterministically, so the observed error is far
  smaller: the bound is what an i.i.d. sampler would also have to meet.)
  """
  packed = _toy_packed(sizes=(4000, 1300, 500))
  props = {"d0": 0.2, "d1": 0.7, "d2": 0.1}
  it = dd.make_train_iterator(packed, 16, proportions=props, seed=1)
  ids = np.concatenate([b["domain_id"] for b in _take(it, 300)])
  n = ids.size
  for d, name in enumerate(packed.names):
    p = props[name]
    freq = np.mean(ids == d)
    assert abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / n), (name, freq, p)


def test_natural_proportions_follow_token_counts():
  packed = _toy_packed(sizes=(4000, 1300, 500))
  it = dd.make_train_iterator(packed, 10, proportions="natural", seed=2)
  ids = np.concatenate([b["domain_id"] for b in _take(it, 290)])
  freq = np.bincount(ids, minlength=3) / ids.size
  np.testing.assert_allclose(freq, np.array([40, 13, 5]) / 58, atol=0.01)


def test_same_seed_same_batches_other_seed_other_batches():
  packed = _toy_packed(sizes=(400, 300, 200))
  kw = dict(proportions={"d0": 1, "d1": 1, "d2": 1})
  a = _take(dd.make_train_iterator(packed, 8, seed=7, **kw), 20)
  b = _take(dd.make_train_iterator(packed, 8, seed=7, **kw), 20)
  c = _take(dd.make_train_iterator(packed, 8, seed=8, **kw), 20)
  _assert_same_batches(a, b)
  assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))


@pytest.mark.parametrize("skip", [0, 1, 7, 23])
def test_resume_through_json_round_trip_is_exact(skip):
  # Domains of 60, 30 and 20 rows: 23 batches of 8 cross epoch boundaries of
  # every domain, where the shuffle changes.
  packed = _toy_packed(sizes=(60, 30, 20))
  kw = dict(proportions={"d0": 0.5, "d1": 0.3, "d2": 0.2}, seed=11)
  it = dd.make_train_iterator(packed, 8, **kw)
  _take(it, skip)
  state = it.get_state()
  restored_state = json.loads(json.dumps(state))
  assert restored_state == state
  expected = _take(it, 15)

  fresh = dd.make_train_iterator(packed, 8, **kw)
  fresh.set_state(restored_state)
  _assert_same_batches(_take(fresh, 15), expected)

  # The same through the helpers (what a trainer writes into its checkpoint).
  text = dd.iterator_state_to_json(state)
  fresh = dd.make_train_iterator(packed, 8, **kw)
  fresh.set_state(dd.iterator_state_from_json(text))
  _assert_same_batches(_take(fresh, 15), expected)


def test_resume_on_the_real_corpus(tokenizer, corpus):
  docs, _ = dd.read_split(corpus, "train")
  packed = dd.pack_domains(docs, tokenizer, 64)
  it = dd.make_train_iterator(packed, 16, proportions="natural", seed=0)
  _take(it, 50)
  text = dd.iterator_state_to_json(it.get_state())
  expected = _take(it, 5)
  fresh = dd.make_train_iterator(packed, 16, proportions="natural", seed=0)
  fresh.set_state(dd.iterator_state_from_json(text))
  _assert_same_batches(_take(fresh, 5), expected)


def test_state_json_helper_refuses_states_json_would_alter():
  with pytest.raises(ValueError, match="round trip"):
    dd.iterator_state_to_json({"parents": [{"pos": (1, 2)}]})
  with pytest.raises(ValueError, match="serialisable"):
    dd.iterator_state_to_json({"buffer": b"\x00\x01"})
  with pytest.raises(ValueError, match="round trip"):
    dd.iterator_state_to_json({"per_key": {1: 2}})


# --------------------------------------------------------------------------
# Validation batches.


def test_eval_batches_cover_every_row_once():
  packed = _toy_packed(sizes=(9, 4, 1))
  batches = dd.make_eval_batches(packed, 4)
  assert list(batches) == packed.names
  assert [len(v) for v in batches.values()] == [3, 1, 1]
  for d, (name, rows) in enumerate(zip(packed.names, packed.rows)):
    kept = []
    for b in batches[name]:
      assert b["tokens"].shape == (4, 4) and b["tokens"].dtype == np.int32
      assert b["mask"].shape == (4,) and b["mask"].dtype == bool
      np.testing.assert_array_equal(b["domain_id"], np.full(4, d, np.int32))
      # Padding only at the end of a batch, and all zeros.
      m = b["mask"]
      assert not np.any(m[np.argmin(m):]) or m.all()
      assert not b["tokens"][~m].any()
      kept.append(b["tokens"][m])
    np.testing.assert_array_equal(np.concatenate(kept), rows)


def test_eval_batches_cap_and_id_order():
  packed = _toy_packed(sizes=(9, 4, 1))
  val = packed.subset(["d2", "d0"])  # a validation split lacking d1
  batches = dd.make_eval_batches(val, 2, max_rows_per_domain=3,
                                 domain_names=packed.names)
  assert list(batches) == ["d2", "d0"]
  assert int(batches["d2"][0]["domain_id"][0]) == 2
  assert int(batches["d0"][0]["domain_id"][0]) == 0
  assert sum(int(b["mask"].sum()) for b in batches["d0"]) == 3
  with pytest.raises(ValueError, match="d0"):
    dd.make_eval_batches(val, 2, domain_names=["d2"])


def test_end_to_end_from_files(corpus, tokenizer, tmp_path):
  """The trainer's path: read, pack (cached), mix, evaluate."""
  train, _ = dd.read_split(corpus, "train")
  val, _ = dd.read_split(corpus, "validation")
  packed = dd.pack_domains_cached(train, tokenizer, 64, tmp_path)
  packed_val = dd.pack_domains_cached(val, tokenizer, 64, tmp_path)
  assert packed_val.names == packed.names
  it = dd.make_train_iterator(packed, 16, proportions="natural", seed=0)
  batch = next(it)
  assert batch["tokens"].shape == (16, 65)
  assert batch["tokens"].max() < len(tokenizer)
  evals = dd.make_eval_batches(packed_val, 16, domain_names=packed.names)
  assert sum(int(b["mask"].sum()) for v in evals.values() for b in v) == sum(
      packed_val.num_rows)


# --------------------------------------------------------------------------
# Per-host shards (several processes, each loading B / n rows).


def _row_ids(batch):
  """(domain, row) of every row of a ``_toy_packed`` batch."""
  t0 = batch["tokens"][:, 0].astype(np.int64)
  return [(int(t // 10**6), int(t % 10**6) // 10) for t in t0]


def test_host_shards_union_is_the_single_host_batch():
  """2 shards of a global batch of 8, weights 1/2, 1/4, 1/4 and domain sizes
  divisible by 2: each host gets 4 rows per step with domain counts exactly
  4 * (1/2, 1/4, 1/4) = (2, 1, 1), the two hosts never share a row, and
  their union is, row for row (as a set), the batch the unsharded iterator
  yields at the same step -- over 40 steps, i.e. across 2, 4 and 8 epochs
  of the domains' shuffles."""
  packed = _toy_packed(sizes=(40, 20, 10))
  kw = dict(proportions={"d0": 0.5, "d1": 0.25, "d2": 0.25}, seed=3)
  single = dd.make_train_iterator(packed, 8, **kw)
  hosts = [dd.make_train_iterator(packed, 8, shard_index=i, shard_count=2, **kw)
           for i in range(2)]
  for step in range(40):
    local = [next(h) for h in hosts]
    ids = [_row_ids(b) for b in local]
    for b in local:
      assert b["tokens"].shape == (4, 4)
      np.testing.assert_array_equal(np.bincount(b["domain_id"], minlength=3), [2, 1, 1])
    assert not set(ids[0]) & set(ids[1]), step
    assert sorted(ids[0] + ids[1]) == sorted(_row_ids(next(single))), step


def test_host_shards_cover_each_epoch_with_a_remainder():
  """3 shards, uniform weights, a global batch of 9 (3 rows per host, one
  of each domain) and domains of 31, 19 and 7 rows (not divisible by 3):
  within each epoch of a domain (10, 6, 2 rows per host) the hosts' rows
  are disjoint and together all but the N mod 3 rows of the domain; the
  left-out rows change between epochs."""
  sizes = (31, 19, 7)
  packed = _toy_packed(sizes=sizes)
  kw = dict(proportions="uniform", seed=4)
  hosts = [dd.make_train_iterator(packed, 9, shard_index=i, shard_count=3, **kw)
           for i in range(3)]
  steps = 60  # 6, 10 and 30 epochs
  rows = {d: [[] for _ in range(3)] for d in range(3)}  # domain -> host -> rows in order
  for _ in range(steps):
    for i, h in enumerate(hosts):
      b = next(h)
      np.testing.assert_array_equal(np.sort(b["domain_id"]), [0, 1, 2])
      for d, r in _row_ids(b):
        rows[d][i].append(r)
  for d, n in enumerate(sizes):
    per_host = n // 3
    left_out = set()
    for e in range(steps // per_host):
      epoch = [rows[d][i][e * per_host:(e + 1) * per_host] for i in range(3)]
      union = [r for part in epoch for r in part]
      assert len(set(union)) == 3 * per_host, (d, e)  # disjoint, no repeats
      assert set(union) <= set(range(n))
      left_out.add(frozenset(range(n)) - frozenset(union))
    assert all(len(s) == n % 3 for s in left_out)
    assert len(left_out) > 1, d  # not the same rows dropped every epoch


@pytest.mark.parametrize("skip", [0, 5, 17])
def test_host_shard_resume_is_exact_and_states_agree(skip):
  """Each host's state is JSON-safe and restores it exactly; the hosts'
  states are equal after the same steps, so host 0's (the one a
  multi-host checkpoint stores) restores host 1 exactly too."""
  packed = _toy_packed(sizes=(30, 16, 10))
  kw = dict(proportions={"d0": 0.5, "d1": 0.3, "d2": 0.2}, seed=9, shard_count=2)
  hosts = [dd.make_train_iterator(packed, 8, shard_index=i, **kw) for i in range(2)]
  for h in hosts:
    _take(h, skip)
  states = [dd.iterator_state_to_json(h.get_state()) for h in hosts]
  assert states[0] == states[1]
  expected = [_take(h, 12) for h in hosts]
  for i in range(2):
    fresh = dd.make_train_iterator(packed, 8, shard_index=i, **kw)
    fresh.set_state(dd.iterator_state_from_json(states[0]))
    _assert_same_batches(_take(fresh, 12), expected[i])


def test_one_shard_is_the_unsharded_iterator():
  packed = _toy_packed(sizes=(30, 16, 10))
  kw = dict(proportions="natural", seed=2)
  _assert_same_batches(_take(dd.make_train_iterator(packed, 6, **kw), 10),
                       _take(dd.make_train_iterator(packed, 6, shard_index=0,
                                                    shard_count=1, **kw), 10))


@pytest.mark.parametrize("batch_size, shard_index, shard_count, sizes, match", [
    (9, 0, 2, (30, 16, 10), "not divisible by shard_count 2"),
    (8, 2, 2, (30, 16, 10), r"shard_count - 1"),
    (8, 0, 0, (30, 16, 10), "positive"),
    (8, 1, 2, (30, 1, 10), r"'d1': 1.*fewer rows than the 2 shards"),
])
def test_bad_shards_are_clear_errors(batch_size, shard_index, shard_count, sizes, match):
  with pytest.raises(ValueError, match=match):
    dd.make_train_iterator(_toy_packed(sizes=sizes), batch_size, proportions="uniform",
                           seed=0, shard_index=shard_index, shard_count=shard_count)
