"""Bounds of the tokenizer: training on pathological documents, and the
context length an exported tokenizer truncates to.

Everything is trained here, offline, on small texts.
"""

import json
import logging
import re
import time

import numpy as np
import pytest

from dograph_jax.data import read_split, write_synthetic_corpus
from dograph_jax.data import tokenizer as tk


def _longest_run(text: str) -> int:
  """Longest run of non-whitespace or of whitespace in ``text``."""
  return max((len(m) for m in re.findall(r"\S+|\s+", text)), default=0)


def _acgt(n: int, seed: int = 0) -> str:
  """Random DNA without whitespace: one run of letters, which the byte-level
  pre-tokenizer does not split."""
  rng = np.random.default_rng(seed)
  return np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, n)].tobytes().decode()


# --------------------------------------------------------------------------
# The splitter.


@pytest.mark.parametrize("text,max_run,want", [
    ("ab cdefgh ij", 3, ["ab cde", "fgh ij"]),
    ("x" * 7, 3, ["xxx", "xxx", "x"]),
    # A whitespace run too; the space before "b" stays with "b".
    ("a" + " " * 7 + "b", 3, ["a   ", "   ", " b"]),
    ("abc def", 3, ["abc def"]),  # runs of exactly max_run: untouched
    ("", 3, [""]),
])
def test_split_long_runs_cuts_only_long_runs(text, max_run, want):
  assert tk.split_long_runs(text, max_run) == want


def test_split_long_runs_bounds_every_run_and_loses_nothing():
  rng = np.random.default_rng(1)
  # Runs of every length around the limit, of both kinds, in one text.
  parts = []
  for n in rng.integers(1, 40, 300):
    parts.append("w" * int(n) if rng.random() < 0.5 else "7" * int(n))
    parts.append(" " * int(rng.integers(1, 3)) if rng.random() < 0.9 else "\n" * 25)
  text = "".join(parts)
  pieces = tk.split_long_runs(text, 16)
  assert "".join(pieces) == text
  assert max(map(_longest_run, pieces)) <= 16
  assert _longest_run(text) > 16 and len(pieces) > 1
  with pytest.raises(ValueError):
    tk.split_long_runs("abc", 0)


# --------------------------------------------------------------------------
# Training.


def test_whitespace_free_document_trains_bounded(monkeypatch, caplog):
  """A 300 kB document of one run: the trainer only ever sees runs of at most
  MAX_TRAIN_RUN characters (unsplit, 200k characters took 18 s and 5 MB more
  than 400 s), and a progress line says what was fed."""
  seen = []
  original = tk._training_pieces  # pylint: disable=protected-access

  def recording(texts, max_run):
    for piece in original(texts, max_run):
      seen.append(piece)
      yield piece

  monkeypatch.setattr(tk, "_training_pieces", recording)
  doc = _acgt(300_000)
  start = time.perf_counter()
  with caplog.at_level(logging.INFO, logger="dograph_jax.data.tokenizer"):
    tok = tk.train_bpe_tokenizer([doc, "a short normal document"], None,
                                 vocab_size=512)
  elapsed = time.perf_counter() - start
  assert "".join(seen) == doc + "a short normal document"
  assert max(map(_longest_run, seen)) <= tk.MAX_TRAIN_RUN
  assert len(seen) >= 300_000 // tk.MAX_TRAIN_RUN
  assert any("fed 2 documents, 300023 characters" in r.getMessage()
             for r in caplog.records)
  # Only a guard (about 1 s here; a loaded CI machine may be much slower).
  assert elapsed < 60, elapsed
  # Encoding is the tokenizer's own, not cut: the whole document round-trips
  # and tokens span the positions where training cut it.
  ids = tok.encode(doc, add_special_tokens=False)
  assert tok.decode(ids) == doc and len(ids) < len(doc) / 2
  assert json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"]["type"] == "ByteLevel"


def test_ordinary_text_gives_the_same_tokenizer(tmp_path):
  """On the synthetic corpus (no run near MAX_TRAIN_RUN) the splitter changes
  nothing: the same vocabulary and merges as a trainer given every document
  whole. A small limit does change them, so the comparison can fail."""
  corpus = write_synthetic_corpus(tmp_path / "corpus", seed=0, total_docs=300)
  docs, _ = read_split(corpus, "train")
  texts = [t for v in docs.values() for t in v]
  assert max(map(_longest_run, texts)) < tk.MAX_TRAIN_RUN

  def model(max_run):
    tok = tk.train_bpe_tokenizer(texts, None, vocab_size=400, max_run=max_run)
    return json.loads(tok.backend_tokenizer.to_str())["model"]

  default = model(tk.MAX_TRAIN_RUN)
  assert default == model(10**9)  # no cut at all
  assert default != model(4)


# --------------------------------------------------------------------------
# Context length of a saved tokenizer.


def test_with_context_sets_model_max_length_on_a_copy():
  tok = tk.train_bpe_tokenizer(["hello world " * 20] * 5, None, vocab_size=300)
  limited = tk.with_context(tok, 64)
  assert limited.model_max_length == 64
  assert tok.model_max_length > 10**9  # the pipeline's tokenizer is untouched
  assert len(limited("x " * 1000, truncation=True)["input_ids"]) == 64
  # Only asked-for truncation: packing encodes whole documents with it too.
  assert len(limited("x " * 1000)["input_ids"]) > 64
  with pytest.raises(ValueError):
    tk.with_context(tok, 0)


@pytest.mark.parametrize("family", ["mini", "llama-mini"])
def test_exported_tokenizer_truncates_to_the_context(tmp_path, family):
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  from dograph_jax.models import get_config, split_model  # pylint: disable=g-import-not-at-top
  from dograph_jax.models.export import export_hf  # pylint: disable=g-import-not-at-top
  from dograph_jax.models.gpt2 import GPT2  # pylint: disable=g-import-not-at-top
  from dograph_jax.models.llama import Llama  # pylint: disable=g-import-not-at-top

  tok = tk.train_bpe_tokenizer(["the river and the gate " * 30] * 5, None,
                               vocab_size=300)
  n_positions = 48
  cfg = get_config(family, vocab_size=len(tok), n_positions=n_positions)
  model_class = Llama if family.startswith("llama") else GPT2
  # Zeros of the model's shapes: only the tokenizer matters here.
  shapes = split_model(nnx.eval_shape(lambda: model_class(cfg, rngs=nnx.Rngs(0))))[1]
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  out = export_hf(cfg, params, tmp_path / "hf", tokenizer=tok)
  loaded = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
  ids = loaded("x " * 10000, truncation=True)["input_ids"]
  assert len(ids) == n_positions
  assert tok.model_max_length > 10**9  # export saved a copy
