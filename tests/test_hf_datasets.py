"""--hf_dataset: a corpus in SlimPajama-6B's layout read through HuggingFace
``datasets``, offline (issue 24, item 5). The file reader, which reads the
same parquet files, is the oracle."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dograph_jax.data import (FileSplit, SkipCounts, pack_split_cached, read_split,
                              train_bpe_tokenizer, write_synthetic_corpus)
from dograph_jax.data import hf
from dograph_jax.train import config, single_run

# The synthetic corpus's domains under SlimPajama's source names.
SOURCES = {"code": "RedPajamaGithub", "dna": "RedPajamaArXiv", "legal": "RedPajamaBook",
           "numbers": "RedPajamaStackExchange", "prose": "RedPajamaC4"}


def _rows(docs, start):
  rows = [{"text": t, "meta": {"redpajama_set_name": SOURCES[n]}} for n, ts in docs.items()
          for t in ts]
  rows[3:3] = [{"text": "   ", "meta": {"redpajama_set_name": "RedPajamaC4"}},  # empty_text
               {"text": "no source", "meta": None}]                            # missing_domain
  for i, r in enumerate(rows):  # pandas' index, as in the published shards
    r["__index_level_0__"] = start + i
  return rows


def _shard(rows, path):
  schema = pa.schema([("text", pa.string()),
                      ("meta", pa.struct([("redpajama_set_name", pa.string())])),
                      ("__index_level_0__", pa.int64())])
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


@pytest.fixture(scope="module")
def slimpajama(tmp_path_factory):
  """``(dataset folder, the same shards in the file reader's layout)``:
  ``SlimPajama-6B/data/{train-0000{0,1}-of-00002,validation-...,test-...}.parquet``."""
  source = write_synthetic_corpus(tmp_path_factory.mktemp("src"), seed=1, total_docs=150)
  root = tmp_path_factory.mktemp("hf")
  data = root / "SlimPajama-6B" / "data"
  files = root / "files"
  train, _ = read_split(source, "train")
  val, _ = read_split(source, "validation")
  rows = _rows(train, 0)
  half = len(rows) // 2
  shards = {"train-00000-of-00002.parquet": rows[:half],
            "train-00001-of-00002.parquet": rows[half:],
            "validation-00000-of-00001.parquet": _rows(val, 0),
            "test-00000-of-00001.parquet": _rows(val, 0)[:5]}
  for name, shard in shards.items():
    _shard(shard, data / name)
    split = name.split("-")[0]
    (files / split).mkdir(parents=True, exist_ok=True)
    shutil.copy(data / name, files / split / name)
  return data.parent, files


@pytest.fixture(scope="module")
def tokenizer(slimpajama):
  docs, _ = read_split(slimpajama[1], "train")
  return train_bpe_tokenizer((t for ts in docs.values() for t in ts), None, vocab_size=300)


def test_the_same_packed_rows_as_the_file_reader(slimpajama, tokenizer, tmp_path):
  folder, files = slimpajama
  splits = hf.hf_splits(str(folder), ("train", "validation"), cache_dir=str(tmp_path / "hf"))
  for got_split, drop in zip(splits, (False, True)):
    got, got_skips = pack_split_cached(got_split, tokenizer, 16, tmp_path / "a", drop_short=drop)
    want, want_skips = pack_split_cached(FileSplit(files, got_split.split), tokenizer, 16,
                                         tmp_path / "b", drop_short=drop)
    assert got.names == want.names == sorted(SOURCES.values())
    assert got.tokens_per_domain == want.tokens_per_domain
    for a, b in zip(got.rows, want.rows):
      np.testing.assert_array_equal(a, b)
    assert got_skips.as_dict() == want_skips.as_dict() == {"empty_text": 1,
                                                           "missing_domain": 1}
    # The same documents: the same content fingerprint, whichever reader.
    assert got.fingerprint == want.fingerprint


def test_offline_a_name_neither_local_nor_cached_is_refused_by_name(slimpajama, tmp_path,
                                                                    monkeypatch):
  before = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
  with pytest.raises(FileNotFoundError, match=r"'DKYoon/SlimPajama-6B' is neither a local "
                                              r"folder nor in the datasets cache"):
    hf.load_offline("DKYoon/SlimPajama-6B", str(tmp_path / "empty_cache"))
  assert {k: os.environ.get(k) for k in before} == before  # put back
  # Once prepared in the cache (here from the local folder, whose name is
  # the dataset's), the name alone loads it, still offline.
  cache = str(tmp_path / "cache")
  by_path = hf.load_offline(str(slimpajama[0]), cache)
  monkeypatch.chdir(tmp_path)  # no folder of that name here
  by_name = hf.load_offline("SlimPajama-6B", cache)
  assert sorted(by_name) == ["test", "train", "validation"]
  assert by_name["train"]["text"] == by_path["train"]["text"]


def test_a_missing_split_or_column_is_named(slimpajama, tmp_path):
  with pytest.raises(ValueError, match=r"no split\(s\) \['dev'\]"):
    hf.hf_splits(str(slimpajama[0]), ("train", "dev"), cache_dir=str(tmp_path))
  split, = hf.hf_splits(str(slimpajama[0]), ("train",), cache_dir=str(tmp_path),
                        domain_field="source", text_field="content")
  with pytest.raises(ValueError, match=r"has none of the expected columns.*'content'"):
    list(split.documents(SkipCounts()))


def test_the_trainer_runs_on_it_and_starts_again_without_reading(slimpajama, tmp_path,
                                                                 monkeypatch):
  folder, _ = slimpajama
  cfg = config.make_config(hf_dataset=str(folder), hf_cache_dir=str(tmp_path / "hf"),
                           cache_dir=str(tmp_path / "cache"), vocab_size=300, model="mini",
                           steps=2, batch_size=4, seq_len=16, eval_every=0, eval_rows=4,
                           save_every=0, log_every=1, warmup_steps=1, method="uniform",
                           out_dir=str(tmp_path / "run"), plots=False)
  summary = single_run.train_run(cfg)
  assert summary["steps"] == 2 and sorted(summary["val_loss"]) == sorted(SOURCES.values())
  assert summary["corpus"]["domains"] == sorted(SOURCES.values())

  def read(self):
    raise AssertionError("a row was read on a start with a valid cache")
  monkeypatch.setattr(hf.HFSplit, "_records", read)
  again = single_run.load_data(cfg)
  assert again.corpus == summary["corpus"] and again.proportions == summary["proportions"]
  assert config.parse_config(["--hf_dataset", "DKYoon/SlimPajama-6B", "--hf_cache_dir",
                              "/x"]).data.hf_dataset == "DKYoon/SlimPajama-6B"


def test_a_changed_shard_gives_another_signature(slimpajama, tmp_path):
  folder = tmp_path / "SlimPajama-6B"
  shutil.copytree(slimpajama[0], folder)
  cache = str(tmp_path / "hf")
  before = hf.hf_splits(str(folder), ("train", "validation"), cache_dir=cache)
  shard = folder / "data" / "train-00001-of-00002.parquet"
  rows = pq.read_table(shard).to_pylist()
  rows[0]["text"] += " changed"
  _shard(rows, shard)
  after = hf.hf_splits(str(folder), ("train", "validation"), cache_dir=cache)
  assert after[0].signature() != before[0].signature()


def test_rnb_refuses_hf_dataset():
  # R&B's regrouping reads --data_dir's files: with --hf_dataset it would
  # silently regroup another corpus.
  with pytest.raises(ValueError, match="cannot read --hf_dataset"):
    config.make_config(method="rnb", hf_dataset="DKYoon/SlimPajama-6B")
