"""Multi-domain text data for language-model pretraining.

* :mod:`~dograph_jax.data.corpus` — :func:`read_split` reads ``jsonl``,
  ``jsonl.gz``/``json.gz`` and ``parquet`` files (SlimPajama or plain schema)
  into documents grouped by domain, counting what it skips (:class:`SkipCounts`);
  :class:`FileSplit` is one split as a stream, identified by its files' metadata;
* :mod:`~dograph_jax.data.hf` — the same through HuggingFace ``datasets``,
  offline (``HFSplit``; imported on use, as ``datasets`` is slow to import);
* :mod:`~dograph_jax.data.tokenizer` — :func:`train_bpe_tokenizer`,
  :func:`load_tokenizer` (byte-level BPE, offline);
* :mod:`~dograph_jax.data.pipeline` — :func:`pack_domains` (rows of
  ``seq_len + 1`` tokens within each domain), mixture proportions,
  :func:`pack_split_cached` (a split packed once into memory-mapped rows,
  found again from file metadata without reading the corpus),
  :func:`make_train_iterator` (grain, checkpointable through JSON),
  :class:`DynamicMixIterator` (proportions that change during a run) and
  :func:`make_eval_batches`;
* :mod:`~dograph_jax.data.synthetic` — :func:`write_synthetic_corpus`, a small
  deterministic five-domain corpus;
* :mod:`~dograph_jax.data.coarse` — :func:`write_coarse_corpus`, a copy of a
  corpus whose training labels hide a source inside another (validation keeps
  the true labels).
"""

from dograph_jax.data.coarse import TRUE_DOMAIN_FIELD, write_coarse_corpus
from dograph_jax.data.corpus import (AUTO_DOMAIN_FIELDS, SKIP_REASONS,
                                     FileSplit, SkipCounts, iter_documents,
                                     list_split_files, read_split)
from dograph_jax.data.pipeline import (DynamicMixIterator, PackedDomains,
                                       integer_weights, interleave_domain,
                                       iterator_state_from_json,
                                       iterator_state_to_json,
                                       make_eval_batches, make_train_dataset,
                                       make_train_iterator,
                                       natural_proportions, pack_domains,
                                       pack_domains_cached, pack_split_cached,
                                       packing_cache_key,
                                       resolve_proportions,
                                       uniform_proportions)
from dograph_jax.data.synthetic import DOMAIN_SHARES, write_synthetic_corpus
from dograph_jax.data.tokenizer import (EOS_TOKEN, load_tokenizer,
                                        train_bpe_tokenizer, with_context)

__all__ = [
    "AUTO_DOMAIN_FIELDS", "DOMAIN_SHARES", "DynamicMixIterator", "EOS_TOKEN", "FileSplit",
    "PackedDomains", "integer_weights", "interleave_domain",
    "SKIP_REASONS", "SkipCounts", "iter_documents", "iterator_state_from_json",
    "iterator_state_to_json", "list_split_files", "load_tokenizer",
    "make_eval_batches", "make_train_dataset", "make_train_iterator",
    "natural_proportions", "pack_domains", "pack_domains_cached",
    "pack_split_cached", "packing_cache_key", "read_split", "resolve_proportions",
    "train_bpe_tokenizer", "uniform_proportions", "with_context", "write_synthetic_corpus",
    "TRUE_DOMAIN_FIELD", "write_coarse_corpus",
]
