"""--text_field, --cache_dir and memory-mapped packed rows (issue 24, item 5)."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from dograph_jax.data import read_split, write_synthetic_corpus
from dograph_jax.train import config, single_run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """The synthetic corpus with the text under another field, ``body``."""
  source = write_synthetic_corpus(tmp_path_factory.mktemp("src"), seed=1, total_docs=150)
  out = tmp_path_factory.mktemp("body")
  for split in ("train", "validation"):
    docs, _ = read_split(source, split)
    (out / split).mkdir()
    (out / split / "part.jsonl").write_text("".join(
        json.dumps({"body": t, "domain": name}) + "\n" for name, ts in docs.items() for t in ts))
  return out


def _cfg(corpus, tmp_path, **kw):
  return config.make_config(data_dir=str(corpus), vocab_size=300, seq_len=16, batch_size=4,
                            method="uniform", text_field="body", out_dir=str(tmp_path / "run"),
                            **kw)


def _files(folder):
  return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_text_field_cache_dir_and_a_read_only_corpus(corpus, tmp_path):
  before = _files(corpus)
  cache = tmp_path / "cache"
  mode = corpus.stat().st_mode
  for folder in (corpus, corpus / "train", corpus / "validation"):  # the corpus may be read-only
    os.chmod(folder, stat.S_IRUSR | stat.S_IXUSR)
  try:
    first = single_run.load_data(_cfg(corpus, tmp_path, cache_dir=str(cache)))
    again = single_run.load_data(_cfg(corpus, tmp_path, cache_dir=str(cache)))
  finally:
    for folder in (corpus, corpus / "train", corpus / "validation"):
      os.chmod(folder, mode)
  assert _files(corpus) == before  # nothing written beside the data
  assert (cache / "tokenizer-bpe-300" / "tokenizer.json").is_file()
  assert any((cache / "packed").iterdir())
  assert first.names == ["code", "dna", "legal", "numbers", "prose"]
  assert first.corpus == again.corpus
  # Read back from the cache: memory-mapped rows, the same batches.
  for _ in range(3):
    a, b = next(first.train_iter), next(again.train_iter)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_packed_rows_come_back_memory_mapped(corpus, tmp_path):
  from dograph_jax.data import load_tokenizer, pack_domains_cached
  cfg = _cfg(corpus, tmp_path, cache_dir=str(tmp_path / "cache"))
  single_run.load_data(cfg)  # trains the tokenizer, packs
  docs, _ = read_split(corpus, "train", text_field="body")
  packed = pack_domains_cached(docs, load_tokenizer(cfg.data.tokenizer_cache()), 16,
                               cfg.data.packing_cache())
  assert all(isinstance(r, np.memmap) for r in packed.rows)
  assert packed.fingerprint
