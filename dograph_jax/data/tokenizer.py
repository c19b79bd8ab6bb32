"""A small byte-level BPE tokenizer, trained and loaded fully offline.

GPT-2's tokenizer is byte-level BPE with ``<|endoftext|>`` as its only special
token; we train the same kind on the corpus at hand (a vocabulary of a few
thousand suits the small models and corpora of the experiments) with the
``tokenizers`` library, and wrap it as a transformers fast tokenizer so that
``save_pretrained`` / ``from_pretrained`` work on a local folder.

Training is bounded on pathological documents: the trainer's cost grows
faster than linearly in the length of a pre-token (a run the byte-level
pre-tokenizer does not split: letters only, digits only, symbols only or
whitespace only, e.g. unwrapped DNA or a megabyte of blank lines), so such
runs are cut into pieces of at most :data:`MAX_TRAIN_RUN` characters before
they reach the trainer (:func:`split_long_runs`). Only training sees the
pieces; encoding is the tokenizer's own.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"

# Longest run of non-whitespace (or of whitespace) that the BPE trainer is
# given. Measured on this 2-core CPU, shared with other jobs (so +-30%), on
# benchmarks/bench_tokenizer.py's document (random ACGT, vocab 2048): one
# unsplit run takes 1.1 s at 50k characters and 4.6 s at 100k (the issue
# measured 17.9 s at 200k, > 400 s at 5 MB), superlinear; 100k spaces or
# digits, 5.2 s and 3.2 s. Cut into runs of N characters, 2 MB took 3.3-4.3 s
# for N = 256 or 512, 2.9-4.8 s for N = 1024, 3.5-5.5 s for N = 2048 and
# 7.4-7.6 s for N = 4096 (1 MB: 1.5 s at 1024, 6.4 s at 16384): flat up to
# ~2k, worse beyond, as each piece still costs superlinearly in N. 1024 sits
# in the flat part and far above the runs of ordinary text (the longest in
# the bundled synthetic corpus is 60 characters; words, URLs and separator
# lines are rarely more than a few hundred), so a tokenizer trained on
# ordinary text is unchanged.
MAX_TRAIN_RUN = 1024

# A run longer than ``max_run`` found from its first character only (the
# lookbehind), so a search costs one pass over the text; without it a run
# just short of the limit would be rescanned from each of its characters.
_LONG_RUN_PATTERNS: dict[int, re.Pattern] = {}


def _long_run_pattern(max_run: int) -> re.Pattern:
  if max_run not in _LONG_RUN_PATTERNS:
    _LONG_RUN_PATTERNS[max_run] = re.compile(
        rf"(?<!\S)\S{{{max_run + 1},}}|(?<!\s)\s{{{max_run + 1},}}")
  return _LONG_RUN_PATTERNS[max_run]


def split_long_runs(text: str, max_run: int = MAX_TRAIN_RUN) -> list[str]:
  """``text`` cut inside its runs of non-whitespace (or of whitespace) longer
  than ``max_run`` characters, so that no piece holds a run longer than that.

  The cuts fall every ``max_run`` characters from a run's start; the first
  piece keeps what precedes the run and the last keeps the run's remainder
  (at least one character) with what follows, so a run's neighbours (e.g.
  the space in front of it, which the byte-level pre-tokenizer attaches to
  the next word) stay as they were. ``"".join`` of the pieces is ``text``; a
  text without a long run is returned as its only piece.
  """
  if max_run < 1:
    raise ValueError(f"max_run must be at least 1, got {max_run}")
  cuts = []
  for m in _long_run_pattern(max_run).finditer(text):
    cuts.extend(range(m.start() + max_run, m.end(), max_run))
  if not cuts:
    return [text]
  bounds = [0, *cuts, len(text)]
  return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def _training_pieces(texts: Iterable[str], max_run: int,
                     progress_every_s: float = 10.0) -> Iterator[str]:
  """The pieces of ``texts`` that the trainer is given (:func:`split_long_runs`),
  logging what was fed every ``progress_every_s`` seconds and once at the end
  (the trainer itself prints nothing, and a big corpus takes minutes)."""
  n_docs = n_chars = n_cut = 0
  start = last = time.perf_counter()
  for text in texts:
    pieces = split_long_runs(text, max_run)
    n_docs += 1
    n_chars += len(text)
    n_cut += len(pieces) > 1
    yield from pieces
    now = time.perf_counter()
    if now - last >= progress_every_s:
      last = now
      logger.info("tokenizer training: fed %d documents, %d characters "
                  "(%.0f s)", n_docs, n_chars, now - start)
  logger.info("tokenizer training: fed %d documents, %d characters in %.1f s "
              "(%d with runs over %d characters, cut for training); learning "
              "the merges", n_docs, n_chars, time.perf_counter() - start,
              n_cut, max_run)


def train_bpe_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike | None,
                        *, vocab_size: int = 2048, min_frequency: int = 2,
                        max_run: int = MAX_TRAIN_RUN):
  """Trains a byte-level BPE tokenizer and saves it with ``save_pretrained``.

  The byte-level alphabet (256 symbols) is always in the vocabulary, so every
  string encodes without an unknown token and decodes back exactly.
  ``<|endoftext|>`` (id 0) is the eos, bos and pad token.

  Args:
    texts: training documents (any iterable; it is consumed once).
    out_dir: folder to save into (created if needed); None to not save.
    vocab_size: target vocabulary size, special token included; a small
      corpus may stop short of it when no pair reaches ``min_frequency``.
    min_frequency: fewest occurrences for a pair to be merged.
    max_run: longest run of non-whitespace or whitespace given to the trainer
      (longer ones are cut, see :func:`split_long_runs`), which bounds the
      training time on documents such as unwrapped DNA; it changes nothing
      for text without such runs, and nothing at all in how texts are encoded.

  Returns:
    A ``transformers.PreTrainedTokenizerFast``.
  """
  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from tokenizers import processors, trainers
  from transformers import PreTrainedTokenizerFast

  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(alphabet) + 1:
    raise ValueError(f"vocab_size={vocab_size} is below the byte alphabet plus "
                     f"the special token ({len(alphabet) + 1})")
  backend = Tokenizer(models.BPE())
  # As GPT-2: no prefix space, so a document's first word is encoded as in
  # running text only when it follows a space; offsets kept untrimmed.
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  backend.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency,
      special_tokens=[EOS_TOKEN], initial_alphabet=alphabet,
      show_progress=False)
  start = time.perf_counter()
  backend.train_from_iterator(_training_pieces(texts, max_run), trainer=trainer)
  logger.info("tokenizer training: %d tokens learnt in %.1f s",
              backend.get_vocab_size(), time.perf_counter() - start)

  tokenizer = PreTrainedTokenizerFast(
      tokenizer_object=backend, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
      pad_token=EOS_TOKEN)
  if out_dir is not None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
  return tokenizer


def load_tokenizer(path: str | os.PathLike):
  """Loads a tokenizer saved with ``save_pretrained`` from a local folder.

  Never touches the network (``local_files_only=True``), so a typo in the
  path fails here instead of turning into a download attempt.

  Args:
    path: folder holding ``tokenizer.json`` (or GPT-2's ``vocab.json`` and
      ``merges.txt``) and ``tokenizer_config.json``.

  Returns:
    A ``transformers.PreTrainedTokenizerFast``.

  Raises:
    FileNotFoundError: ``path`` is not an existing folder.
  """
  # pylint: disable-next=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast

  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"tokenizer folder {str(path)!r} does not exist "
                            "(train one with experiments/train_tokenizer.py)")
  return PreTrainedTokenizerFast.from_pretrained(str(path),
                                                 local_files_only=True)


def with_context(tokenizer, n_positions: int):
  """A copy of ``tokenizer`` whose ``model_max_length`` is ``n_positions``.

  A trained tokenizer knows no context length (``model_max_length`` is
  transformers' "unlimited" sentinel), so a saved one lets
  ``tokenizer(text, truncation=True)`` return more ids than the model has
  positions. Save this copy beside a model (export, a run directory). A copy,
  because the data pipeline encodes whole documents with the original, and a
  limit there would only add a warning per long document.
  """
  if int(n_positions) < 1:
    raise ValueError(f"n_positions must be positive, got {n_positions}")
  out = copy.deepcopy(tokenizer)
  out.model_max_length = int(n_positions)
  return out
