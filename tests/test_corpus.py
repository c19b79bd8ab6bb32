"""Corpus reading, the synthetic corpus and the local-corpus builder.

Everything is written into pytest's tmp dirs; nothing is downloaded.
"""

import gzip
import importlib.util
import json
import logging
import os
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dograph_jax.data import (DOMAIN_SHARES, SKIP_REASONS, SkipCounts,
                              read_split, write_synthetic_corpus)

REPO = Path(__file__).resolve().parents[1]


def _sp(text, domain):
  return {"text": text, "meta": {"redpajama_set_name": domain}}


def _plain(text, domain):
  return {"text": text, "domain": domain}


def _write_lines(path, lines, *, gz=False):
  """Writes JSON lines (dicts are dumped, bytes and str written as they are)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  data = b"".join(
      (x if isinstance(x, bytes) else
       (x if isinstance(x, str) else json.dumps(x)).encode("utf-8")) + b"\n"
      for x in lines)
  path.write_bytes(gzip.compress(data, mtime=0) if gz else data)


# --------------------------------------------------------------------------
# Reading.


def test_reads_both_schemas_all_formats_recursively(tmp_path):
  train = tmp_path / "train"
  _write_lines(train / "a.jsonl", [_sp("c4 one", "RedPajamaC4"),
                                   _sp("gh one", "RedPajamaGithub")])
  _write_lines(train / "sub" / "b.jsonl.gz",
               [_plain("c4 two", "RedPajamaC4"), _plain("wiki one", "wiki")],
               gz=True)
  _write_lines(train / "sub" / "deeper" / "c.json.gz",
               [_sp("gh two", "RedPajamaGithub")], gz=True)
  # Parquet with meta as a struct column, the way SlimPajama exports store it.
  pq.write_table(pa.Table.from_pylist([_sp("wiki two", "wiki"),
                                       _sp("c4 three", "RedPajamaC4")]),
                 train / "d.parquet")
  (train / "notes.txt").write_text("not a data file")

  docs, skips = read_split(tmp_path, "train")
  assert list(docs) == ["RedPajamaC4", "RedPajamaGithub", "wiki"]  # sorted
  # Files in sorted path order (a, d, sub/b, sub/deeper/c), records in order.
  assert docs == {"RedPajamaC4": ["c4 one", "c4 three", "c4 two"],
                  "RedPajamaGithub": ["gh one", "gh two"],
                  "wiki": ["wiki two", "wiki one"]}
  assert skips.total == 0 and skips.as_dict() == {}


def test_configurable_domain_and_text_fields(tmp_path):
  _write_lines(tmp_path / "train" / "x.jsonl", [
      {"text": "a", "domain": "plain_dom", "meta": {"redpajama_set_name": "sp_dom"}},
      _plain("b", "plain_dom"),
      _sp("c", "sp_dom"),
      {"body": {"content": "d"}, "source": {"name": "nested"}},
  ])
  docs, _ = read_split(tmp_path, "train")  # auto: SlimPajama path wins
  assert docs == {"plain_dom": ["b"], "sp_dom": ["a", "c"]}

  docs, skips = read_split(tmp_path, "train", domain_field="domain")
  assert docs == {"plain_dom": ["a", "b"]}
  assert skips.as_dict() == {"missing_domain": 2}

  docs, skips = read_split(tmp_path, "train",
                           domain_field="meta.redpajama_set_name")
  assert docs == {"sp_dom": ["a", "c"]}
  assert skips.as_dict() == {"missing_domain": 2}

  docs, skips = read_split(tmp_path, "train", domain_field="source.name",
                           text_field="body.content")
  assert docs == {"nested": ["d"]}
  assert skips.as_dict() == {"missing_domain": 3}


def test_parquet_meta_as_json_string(tmp_path):
  (tmp_path / "train").mkdir()
  table = pa.table({"text": ["one", "two"],
                    "meta": [json.dumps({"redpajama_set_name": "A"}),
                             json.dumps({"redpajama_set_name": "B"})]})
  pq.write_table(table, tmp_path / "train" / "x.parquet")
  docs, _ = read_split(tmp_path, "train")
  assert docs == {"A": ["one"], "B": ["two"]}


def test_bad_records_and_files_counted_by_reason(tmp_path, caplog):
  train = tmp_path / "train"
  good = [_sp(f"good {i}", "A" if i % 2 else "B") for i in range(6)]
  bad = [
      b'{"text": "caf\xe9", "meta": {"redpajama_set_name": "A"}}',  # latin-1
      '{"text": "unterminated',                                      # JSON
      "[1, 2, 3]",                                                   # array
      {"meta": {"redpajama_set_name": "A"}},                         # no text
      {"text": None, "domain": "A"},                                 # null text
      {"text": 123, "domain": "B"},                                  # non-str
      {"text": "", "domain": "A"},                                   # empty
      {"text": "  \n\t", "domain": "B"},                             # blank
      {"text": "orphan"},                                            # no domain
      {"text": "x", "domain": 42},                                   # bad domain
      {"text": "x", "domain": ""},                                   # bad domain
      '{"text": "lone \\ud800 surrogate", "domain": "A"}',           # bad UTF-16
      "   ",                                                         # blank line: ignored
  ]
  # Interleave good and bad lines so that a skip that swallowed its
  # neighbour would show.
  lines = [x for pair in zip(good, bad) for x in pair] + bad[len(good):]
  _write_lines(train / "mixed.jsonl", lines)
  _write_lines(train / "also_good.jsonl.gz", [_sp("good gz", "A")], gz=True)
  (train / "garbage.jsonl.gz").write_bytes(b"this is not gzip at all" * 10)
  (train / "broken.parquet").write_bytes(b"PAR1 no footer here")
  os.symlink(tmp_path / "does_not_exist", train / "dangling.jsonl")

  with caplog.at_level(logging.INFO, logger="dograph_jax.data.corpus"):
    docs, skips = read_split(tmp_path, "train")
  assert docs == {"A": ["good gz", "good 1", "good 3", "good 5"],
                  "B": ["good 0", "good 2", "good 4"]}
  assert skips.as_dict() == {
      "bad_domain": 2, "corrupt_file": 2, "empty_text": 2, "invalid_json": 1,
      "invalid_utf8": 2, "missing_domain": 1, "missing_text": 2,
      "non_string_text": 1, "not_an_object": 1, "unreadable_file": 1}
  assert skips.total == 15
  assert set(skips.as_dict()) <= set(SKIP_REASONS)
  summary = [r for r in caplog.records if r.getMessage().startswith("read ")]
  assert len(summary) == 1 and "skipped 15" in summary[0].getMessage()


def test_empty_files_are_named_and_counted(tmp_path, caplog):
  train = tmp_path / "train"
  _write_lines(train / "good.jsonl", [_plain("kept", "A")])
  empty = [train / "a.jsonl", train / "b.json.gz", train / "sub" / "c.parquet"]
  for path in empty:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
  with caplog.at_level(logging.INFO, logger="dograph_jax.data.corpus"):
    docs, skips = read_split(tmp_path, "train")
  assert docs == {"A": ["kept"]}
  # One count per file, under its own reason (a 0-byte parquet was counted
  # as corrupt before, a 0-byte JSON lines file not at all).
  assert skips.as_dict() == {"empty_file": 3} and "empty_file" in SKIP_REASONS
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING]
  for path in empty:
    assert any(str(path) in w and "0 bytes" in w for w in warnings), path


def test_parquet_without_expected_columns_names_file_and_columns(tmp_path):
  (tmp_path / "train").mkdir()
  path = tmp_path / "train" / "other.parquet"
  pq.write_table(pa.table({"content": ["a", "b"], "source": ["x", "y"]}), path)
  with pytest.raises(ValueError) as e:
    read_split(tmp_path, "train")
  message = str(e.value)
  for part in (str(path), "'content'", "'source'", "'text'",
               "'meta.redpajama_set_name'", "'domain'"):
    assert part in message, (part, message)
  # The domain field asked for is the one named.
  with pytest.raises(ValueError, match="'source.name'"):
    read_split(tmp_path, "train", domain_field="source.name",
               text_field="body")


def test_parquet_without_domain_column_warns_with_its_columns(tmp_path, caplog):
  train = tmp_path / "train"
  _write_lines(train / "a.jsonl", [_plain("kept", "A")])
  path = train / "b.parquet"
  pq.write_table(pa.table({"text": ["t1", "t2"], "source": ["x", "y"]}), path)
  with caplog.at_level(logging.WARNING, logger="dograph_jax.data.corpus"):
    docs, skips = read_split(tmp_path, "train")
  assert docs == {"A": ["kept"]}
  assert skips.as_dict() == {"missing_domain": 2}  # counted per row, as before
  warning, = [r.getMessage() for r in caplog.records
              if str(path) in r.getMessage()]
  assert "no domain column" in warning and "'source'" in warning, warning


def test_truncated_gzip_keeps_what_was_read(tmp_path):
  records = [_plain(f"document number {i} " + "x" * 200, "A")
             for i in range(2000)]
  data = gzip.compress(b"".join(json.dumps(r).encode() + b"\n"
                                for r in records), mtime=0)
  (tmp_path / "train").mkdir()
  (tmp_path / "train" / "t.jsonl.gz").write_bytes(data[:len(data) // 2])
  docs, skips = read_split(tmp_path, "train")
  assert skips.as_dict() == {"corrupt_file": 1}
  got = docs["A"]
  assert 0 < len(got) < len(records)
  assert got == [r["text"] for r in records[:len(got)]]  # a clean prefix


def test_missing_paths_and_empty_splits_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    read_split(tmp_path / "nowhere", "train")
  with pytest.raises(FileNotFoundError, match="validation"):
    read_split(tmp_path, "validation")
  (tmp_path / "train").mkdir()
  (tmp_path / "train" / "readme.md").write_text("hi")
  with pytest.raises(ValueError, match="no data files"):
    read_split(tmp_path, "train")


def test_domain_without_usable_documents_is_an_error(tmp_path):
  _write_lines(tmp_path / "train" / "x.jsonl", [
      _plain("fine", "A"), _plain("", "B"), {"text": 5, "domain": "B"}])
  with pytest.raises(ValueError, match=r"\['B'\]"):
    read_split(tmp_path, "train")
  _write_lines(tmp_path / "validation" / "x.jsonl", [{"text": "no domain"}])
  with pytest.raises(ValueError, match="no usable document"):
    read_split(tmp_path, "validation")


def test_skip_counts_api():
  s = SkipCounts()
  s.add("invalid_json")
  s.add("empty_text", 3)
  assert s.total == 4 and s["empty_text"] == 3 and s["bad_domain"] == 0
  assert s.as_dict() == {"empty_text": 3, "invalid_json": 1}
  with pytest.raises(KeyError):
    s.add("typo")


# --------------------------------------------------------------------------
# Synthetic corpus.


def _tree_bytes(root):
  return {str(p.relative_to(root)): p.read_bytes()
          for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_synthetic_corpus_is_deterministic_and_fast(tmp_path):
  t0 = time.perf_counter()
  write_synthetic_corpus(tmp_path / "a", seed=3)
  elapsed = time.perf_counter() - t0
  write_synthetic_corpus(tmp_path / "b", seed=3)
  write_synthetic_corpus(tmp_path / "c", seed=4)
  a, b, c = (_tree_bytes(tmp_path / x) for x in "abc")
  assert a == b
  assert a.keys() == c.keys() and a != c
  assert sorted(a) == ["train/chunk_0000.jsonl", "train/chunk_0001.jsonl",
                       "train/chunk_0002.jsonl", "train/chunk_0003.jsonl",
                       "validation/chunk_0000.jsonl"]
  mb = sum(len(v) for v in a.values()) / 1e6
  assert 1.0 < mb < 3.0, mb
  assert elapsed < 5.0, elapsed


def test_synthetic_corpus_domains_have_distinct_statistics(tmp_path):
  root = write_synthetic_corpus(tmp_path, seed=0)
  docs, skips = read_split(root, "train")
  val, _ = read_split(root, "validation")
  assert skips.total == 0
  assert list(docs) == sorted(DOMAIN_SHARES) and list(val) == list(docs)
  n = sum(len(v) for v in docs.values())
  for name, share in DOMAIN_SHARES.items():
    assert len(docs[name]) / n == pytest.approx(share, abs=0.01), name
    assert len(val[name]) >= 2

  # Each domain looks like what it claims to be.
  dna = "".join(docs["dna"])
  body = re.sub(r">seq\d+ len=\d+\n", "", dna).replace("\n", "")
  assert set(body) == set("ACGT")
  for line in "\n".join(docs["numbers"][:50]).splitlines():
    lhs, rhs = line.split(" = ")
    assert eval(lhs) == int(rhs)  # pylint: disable=eval-used
  assert all(d.lstrip().startswith("def ") for d in docs["code"])
  for d in docs["code"][:50]:
    compile(d, "<synthetic>", "exec")  # python-like: it even parses
  assert all("Agreement" in d for d in docs["legal"])
  assert not any(ch.isdigit() for ch in "".join(docs["prose"]))
  # Clearly different character statistics and document lengths.
  def share(name, pred):
    s = "".join(docs[name])
    return sum(map(pred, s)) / len(s)
  symbol = lambda c: not c.isalnum() and not c.isspace()
  assert share("numbers", str.isdigit) > 0.4 > share("code", str.isdigit)
  assert share("dna", str.isalpha) > 0.9
  assert share("code", symbol) > 0.1 > share("prose", symbol)
  assert share("code", str.isspace) > 0.25 > share("prose", str.isspace)
  mean_len = {k: sum(map(len, v)) / len(v) for k, v in docs.items()}
  assert mean_len["legal"] > 1.5 * max(mean_len["prose"], mean_len["code"])


def test_synthetic_plain_schema(tmp_path):
  root = write_synthetic_corpus(tmp_path, seed=1, total_docs=200,
                                schema="plain")
  first = json.loads((root / "train" / "chunk_0000.jsonl").read_text()
                     .splitlines()[0])
  assert set(first) == {"text", "domain"}
  docs, _ = read_split(root, "train", domain_field="domain")
  assert list(docs) == sorted(DOMAIN_SHARES)


# --------------------------------------------------------------------------
# The local-corpus builder.


def _load_builder():
  path = REPO / "experiments" / "data" / "build_local_corpus.py"
  spec = importlib.util.spec_from_file_location("build_local_corpus", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_troff_to_text():
  blc = _load_builder()
  page = "\n".join([
      '.\\" a comment', ".TH LS 1", ".SH NAME", "ls \\- list directory contents",
      ".SH SYNOPSIS", ".B ls", "[\\fIOPTION\\fR]... [\\fIFILE\\fR]...",
      ".PP", ".BR stat (2)", "Use \\(aqquotes\\(aq and \\e and \\&.dots."])
  text = blc.troff_to_text(page)
  assert text == ("NAME\nls - list directory contents\n\nSYNOPSIS\nls\n"
                  "[OPTION]... [FILE]...\n\nstat(2)\n"
                  "Use 'quotes' and \\ and .dots.\n")


def test_build_local_corpus_tiny_budget(tmp_path):
  blc = _load_builder()
  present = [n for n, src in blc.SOURCES.items() if next(iter(src()), None)]
  if len(present) < 2:
    pytest.skip(f"this machine has sources for only {present}")
  shares = {n: 1.0 for n in present}
  summary = blc.build_corpus(tmp_path / "a", budget_mb=0.1, shares=shares,
                             val_fraction=0.2, seed=0, max_doc_chars=4000)
  assert sorted(summary) == sorted(present)
  for s in summary.values():
    assert s["train_docs"] >= 1 and s["val_docs"] >= 1
  docs, skips = read_split(tmp_path / "a", "train")
  val, _ = read_split(tmp_path / "a", "validation")
  assert list(docs) == sorted(present) == list(val) and skips.total == 0
  total = sum(len(t.encode()) for v in (*docs.values(), *val.values())
              for t in v)
  # Filled to the budget, overshooting by less than one document per domain.
  assert 0.1e6 <= total < 0.1e6 + 4000 * 4 * len(present)
  assert all(len(t) <= 4000 for v in docs.values() for t in v)

  # Deterministic: the same arguments give the same bytes.
  blc.build_corpus(tmp_path / "b", budget_mb=0.1, shares=shares,
                   val_fraction=0.2, seed=0, max_doc_chars=4000)
  assert _tree_bytes(tmp_path / "a") == _tree_bytes(tmp_path / "b")
  # An earlier build is not silently mixed with a new one.
  with pytest.raises(FileExistsError):
    blc.build_corpus(tmp_path / "a", budget_mb=0.1, shares=shares)
  with pytest.raises(ValueError):
    blc.parse_shares("python=0.5,nonsense=0.5")
  assert blc.parse_shares("python=0.5, licenses=0.25") == {
      "python": 0.5, "licenses": 0.25}
