"""--text_field, --cache_dir, memory-mapped packed rows found again from the
files' metadata without reading the corpus (issue 24, item 5)."""

from __future__ import annotations

import json
import logging
import os
import stat

import numpy as np
import pytest

from dograph_jax.data import (FileSplit, load_tokenizer, pack_domains, pack_split_cached,
                              packing_cache_key, read_split, write_synthetic_corpus)
from dograph_jax.data import corpus as corpus_module
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
  from dograph_jax.data import FileSplit, load_tokenizer, pack_split_cached
  cfg = _cfg(corpus, tmp_path, cache_dir=str(tmp_path / "cache"))
  single_run.load_data(cfg)  # trains the tokenizer, packs
  packed, _ = pack_split_cached(FileSplit(corpus, "train", text_field="body"),
                                load_tokenizer(cfg.data.tokenizer_cache()), 16,
                                cfg.data.packing_cache())
  assert all(isinstance(r, np.memmap) for r in packed.rows)
  assert packed.fingerprint


# --------------------------------------------------------------------------
# A start with the cache reads no document (issue 24, item 5).


def _write_split(folder, records):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def small(corpus, tmp_path):
  """A copy of ``corpus`` in the plain schema, two files per split, with a
  few records that the reader skips (counted)."""
  out = tmp_path / "small"
  for split in ("train", "validation"):
    docs, _ = read_split(corpus, split, text_field="body")
    records = [{"text": t, "domain": n} for n, ts in docs.items() for t in ts]
    half = len(records) // 2
    _write_split(out / split, records[:half])
    (out / split / "more.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records[half:])
        + json.dumps({"text": "", "domain": "code"}) + "\n"   # empty_text
        + json.dumps({"text": "no domain"}) + "\n")           # missing_domain
  return out


def _small_cfg(data, tmp_path, **kw):
  return config.make_config(data_dir=str(data), vocab_size=300, seq_len=16, batch_size=4,
                            method="uniform", out_dir=str(tmp_path / "run"),
                            cache_dir=str(tmp_path / "cache"), **kw)


def _no_reading(monkeypatch):
  """Any record read from a file fails the test."""
  def read(*args, **kwargs):
    raise AssertionError("a document was read on a start with a valid cache")
  monkeypatch.setattr(corpus_module, "iter_file_records", read)


def test_a_start_with_the_cache_reads_no_document(small, tmp_path, monkeypatch, caplog):
  cfg = _small_cfg(small, tmp_path)
  first = single_run.load_data(cfg)
  _no_reading(monkeypatch)
  with caplog.at_level(logging.INFO):
    again = single_run.load_data(cfg)
  assert again.corpus == first.corpus and again.proportions == first.proportions
  assert again.token_shares == first.token_shares and again.rows == first.rows
  # The skipped records of the reading that built the cache are logged again.
  hits = [r.getMessage() for r in caplog.records if "packed rows from" in r.getMessage()]
  assert len(hits) == 2 and all("skipped 2 when read" in h for h in hits), hits
  assert "empty_text=1" in hits[0] and "missing_domain=1" in hits[0]
  for _ in range(3):
    a, b = next(first.train_iter), next(again.train_iter)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_streamed_packing_equals_packing_the_documents_read(small, tmp_path):
  """The oracle: pack_domains of read_split's documents, and its fingerprint."""
  cfg = _small_cfg(small, tmp_path)
  single_run.load_data(cfg)
  tokenizer = load_tokenizer(cfg.data.tokenizer_cache())
  for split, drop in (("train", False), ("validation", True)):
    docs, skips = read_split(small, split)
    want = pack_domains(docs, tokenizer, 16, drop_short=drop)
    got, got_skips = pack_split_cached(FileSplit(small, split), tokenizer, 16,
                                       cfg.data.packing_cache(), drop_short=drop)
    assert got.names == want.names and got.tokens_per_domain == want.tokens_per_domain
    for a, b in zip(got.rows, want.rows):
      np.testing.assert_array_equal(a, b)
    assert got_skips.as_dict() == skips.as_dict() == {"empty_text": 1, "missing_domain": 1}
    assert got.fingerprint == packing_cache_key(docs, tokenizer, 16, drop_short=drop)


def _entries(cfg):
  return sorted(p.name for p in cfg.data.packing_cache().iterdir() if p.name.startswith("packed-"))


def test_a_changed_added_or_removed_file_invalidates_the_cache(small, tmp_path):
  cfg = _small_cfg(small, tmp_path)
  base = single_run.load_data(cfg).corpus
  assert len(_entries(cfg)) == 2  # train and validation
  part = small / "train" / "part.jsonl"
  text = part.read_text()

  # Touched only (the same bytes, a new mtime): a new entry, the same content
  # fingerprint, so a run can still be resumed on it.
  os.utime(part, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns + 10**9))
  assert single_run.load_data(cfg).corpus == base
  assert len(_entries(cfg)) == 3

  # Changed: one letter of one document (the same size).
  i = text.index('"text": "') + len('"text": "')
  part.write_text(text[:i] + ("X" if text[i] != "X" else "Y") + text[i + 1:])
  changed = single_run.load_data(cfg).corpus
  assert changed["train"] != base["train"] and changed["validation"] == base["validation"]
  assert single_run.corpus_changes(base, changed)
  assert len(_entries(cfg)) == 4

  # Added: another file.
  (small / "train" / "extra.jsonl").write_text(
      json.dumps({"text": "an added document " * 20, "domain": "code"}) + "\n")
  added = single_run.load_data(cfg).corpus
  assert added["train"] not in (base["train"], changed["train"])
  assert added["rows"]["code"] > changed["rows"]["code"]
  assert len(_entries(cfg)) == 5

  # Removed: back to the changed corpus, whose entry is found again.
  (small / "train" / "extra.jsonl").unlink()
  assert single_run.load_data(cfg).corpus == changed
  assert len(_entries(cfg)) == 5


def test_a_changed_text_is_refused_on_resume(small, tmp_path):
  """The same domains and rows per domain, one text changed: the content
  fingerprint refuses the resume, which domain names and row counts alone
  would not."""
  cfg = _small_cfg(small, tmp_path, model="mini", steps=4, eval_every=0, eval_rows=4,
                   save_every=2, log_every=1, warmup_steps=1, plots=False)
  single_run.train_run(config.replace(cfg, halt_after=2))
  part = small / "train" / "part.jsonl"
  text = part.read_text()
  i = text.index('"text": "') + len('"text": "')
  part.write_text(text[:i] + ("X" if text[i] != "X" else "Y") + text[i + 1:])
  with pytest.raises(ValueError, match=r"the corpus changed.*the train split's texts"):
    single_run.train_run(config.replace(cfg, resume=True))


def test_corpus_records_of_another_fingerprint_version_compare_domains_and_rows():
  now = {"domains": ["a", "b"], "rows": {"a": 3, "b": 4}, "train": "f2", "validation": "g2",
         "fingerprint_version": single_run.CORPUS_FINGERPRINT}
  old = {"domains": ["a", "b"], "rows": {"a": 3, "b": 4}, "train": "f1", "validation": "g1"}
  assert single_run.corpus_changes(old, now) == []
  assert single_run.corpus_changes({**old, "rows": {"a": 3, "b": 5}}, now)
  assert single_run.corpus_changes({**now, "train": "other"}, now)
