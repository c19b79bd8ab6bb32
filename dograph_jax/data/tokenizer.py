"""A small byte-level BPE tokenizer, trained and loaded fully offline.

GPT-2's tokenizer is byte-level BPE with ``<|endoftext|>`` as its only special
token; we train the same kind on the corpus at hand (a vocabulary of a few
thousand suits the small models and corpora of the experiments) with the
``tokenizers`` library, and wrap it as a transformers fast tokenizer so that
``save_pretrained`` / ``from_pretrained`` work on a local folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike | None,
                        *, vocab_size: int = 2048, min_frequency: int = 2):
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
  backend.train_from_iterator(texts, trainer=trainer)

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
