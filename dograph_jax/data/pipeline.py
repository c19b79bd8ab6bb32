"""Packing documents into fixed-length rows and mixing domains with grain.

The order of operations follows the grain facts in STYLE.md: tokenize and pack
*within* each domain, in numpy, once; then let grain only shuffle, repeat and
mix rows that already have their final shape. Two consequences:

* every row belongs to exactly one domain, so a batch carries a true
  ``domain_id`` per row (for per-domain losses and for judging how well
  model-centric domains match the human ones);
* the pipeline holds no packing buffer, so its state is a handful of integers
  (one position per domain plus the mixer's index) that survives a JSON round
  trip exactly, which grain's ``ConcatThenSplitIterDataset`` state does not.

The packing is done once per split and cached on disk
(:func:`pack_split_cached`): the entry is found from the split's file
metadata, so a start with the cache reads no document, and its rows are
memory-mapped, so no process holds the corpus in memory.

Shape legend: ``B`` batch size, ``L`` = ``seq_len``, rows have ``L + 1``
tokens (inputs are ``tokens[:, :-1]``, targets ``tokens[:, 1:]``), ``N_d``
rows in domain ``d``.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from dograph_jax.data import corpus

logger = logging.getLogger(__name__)

# Bump when the packing or the cache layout changes, to invalidate old caches
# (2: keys from file metadata, content fingerprints, skips kept with the rows).
_CACHE_VERSION = 2
# Documents handed to the tokenizer per call: bounds the memory of the
# encodings while keeping the Rust batch encoder busy.
_ENCODE_CHUNK = 1024


# eq=False: the fields hold arrays, whose == is elementwise.
@dataclasses.dataclass(frozen=True, eq=False)
class PackedDomains:
  """Token rows of each domain, packed separately.

  Attributes:
    names: domain names; the position of a name is its ``domain_id``.
    rows: per domain, an ``(N_d, L + 1)`` int32 array of consecutive windows
      of the domain's token stream.
    tokens_per_domain: per domain, the length of its token stream (documents
      plus one eos each) before the incomplete last row was dropped.
    seq_len: ``L``.
  """
  names: list[str]
  rows: list[np.ndarray]
  tokens_per_domain: list[int]
  seq_len: int
  # What was packed: :func:`packing_cache_key` of the texts, names,
  # tokenizer and seq_len ("" when not known, e.g. built by hand).
  fingerprint: str = ""

  def __post_init__(self):
    if not (len(self.names) == len(self.rows) == len(self.tokens_per_domain)):
      raise ValueError("names, rows and tokens_per_domain differ in length")
    if len(set(self.names)) != len(self.names):
      raise ValueError(f"duplicate domain names in {self.names}")
    for name, r in zip(self.names, self.rows):
      if r.ndim != 2 or r.shape[1] != self.seq_len + 1 or r.dtype != np.int32:
        raise ValueError(
            f"rows of domain {name!r} have shape {r.shape} and dtype "
            f"{r.dtype}; expected (N, {self.seq_len + 1}) int32")

  @property
  def num_rows(self) -> list[int]:
    """``N_d`` per domain."""
    return [int(r.shape[0]) for r in self.rows]

  def subset(self, names: Sequence[str]) -> PackedDomains:
    """The given domains only, in the given order (ids follow that order)."""
    index = {n: i for i, n in enumerate(self.names)}
    unknown = [n for n in names if n not in index]
    if unknown:
      raise KeyError(f"unknown domain(s) {unknown}; known: {self.names}")
    picked = hashlib.sha256(f"{self.fingerprint}|subset={list(names)}".encode()).hexdigest()
    return PackedDomains(
        names=list(names), rows=[self.rows[index[n]] for n in names],
        tokens_per_domain=[self.tokens_per_domain[index[n]] for n in names],
        seq_len=self.seq_len, fingerprint=picked if self.fingerprint else "")


def _eos_id(tokenizer) -> int:
  eos = getattr(tokenizer, "eos_token_id", None)
  if eos is None:
    raise ValueError("the tokenizer has no eos token; packing needs one to "
                     "separate documents")
  return int(eos)


def _encoder(tokenizer):
  """A function ``list[str] -> list[list[int]]`` without special tokens.

  For a fast tokenizer we encode with a private copy of its Rust backend on
  which ``encode_special_tokens`` is set: a document that happens to contain
  the literal text ``<|endoftext|>`` is then encoded as that text, so the eos
  id in a packed stream marks document boundaries and nothing else. The copy
  also has no truncation or padding, whatever the wrapper was configured with.
  """
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    private = Tokenizer.from_str(backend.to_str())
    private.no_truncation()
    private.no_padding()
    private.encode_special_tokens = True

    def encode(texts):
      return [e.ids for e in private.encode_batch(texts,
                                                  add_special_tokens=False)]
    return encode

  def encode_slow(texts):
    return tokenizer(list(texts), add_special_tokens=False,
                     return_attention_mask=False)["input_ids"]
  return encode_slow


def _token_stream(docs: Sequence[str], encode, eos: int) -> np.ndarray:
  """``doc_0 eos doc_1 eos ...`` as one int32 vector."""
  pieces = []
  eos_arr = np.asarray([eos], np.int32)
  for start in range(0, len(docs), _ENCODE_CHUNK):
    for ids in encode(docs[start:start + _ENCODE_CHUNK]):
      pieces.append(np.asarray(ids, np.int32))
      pieces.append(eos_arr)
  if not pieces:
    return np.zeros((0,), np.int32)
  return np.concatenate(pieces)


def _too_short(name: str, tokens: int, docs: int, width: int, drop_short: bool) -> None:
  """Warns that a domain shorter than one row is left out, or raises."""
  if drop_short:
    logger.warning(
        "domain %r has %d tokens in %d documents, fewer than one row of seq_len + 1 = %d: "
        "left out", name, tokens, docs, width)
    return
  raise ValueError(
      f"domain {name!r} has {tokens} tokens in {docs} documents, fewer than one row of "
      f"seq_len + 1 = {width}; add documents, lower seq_len, or drop the domain")


def pack_domains(docs_by_domain: Mapping[str, Sequence[str]], tokenizer,
                 seq_len: int, *, drop_short: bool = False) -> PackedDomains:
  """Tokenizes and packs each domain into rows of ``seq_len + 1`` tokens.

  Every document gets an eos appended; a domain's documents are concatenated
  in order into one stream, which is cut into consecutive, non-overlapping
  rows of ``L + 1`` tokens. The incomplete tail of each stream (fewer than
  ``L + 1`` tokens) is dropped. Rows never mix domains; a document longer
  than a row spans several rows, and a row may hold several documents.

  Args:
    docs_by_domain: domain name -> documents (e.g. from ``read_split``); the
      iteration order fixes the domain ids.
    tokenizer: a transformers tokenizer with an eos token.
    seq_len: ``L``, the model's context length.
    drop_short: leave out, with a warning, a domain whose stream is shorter
      than one row instead of raising (a validation split's small domain).

  Returns:
    The :class:`PackedDomains`.

  Raises:
    ValueError: no domains, no eos token, or (without ``drop_short``) a
      domain whose stream is shorter than one row (the message names it).
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  if not docs_by_domain:
    raise ValueError("no domains to pack")
  eos = _eos_id(tokenizer)
  encode = _encoder(tokenizer)
  width = seq_len + 1
  names, rows, tokens = [], [], []
  for name, docs in docs_by_domain.items():
    stream_T = _token_stream(list(docs), encode, eos)
    n = stream_T.shape[0] // width
    if n == 0:
      _too_short(name, stream_T.shape[0], len(docs), width, drop_short)
      continue
    names.append(name)
    # A copy, so the rows do not keep the (slightly larger) stream alive.
    rows.append(stream_T[:n * width].reshape(n, width).copy())
    tokens.append(int(stream_T.shape[0]))
  packed = PackedDomains(names=names, rows=rows, tokens_per_domain=tokens,
                         seq_len=seq_len)
  logger.info("packed %d domains into rows of %d tokens: %s", len(names), width,
              ", ".join(f"{n}={r}" for n, r in zip(names, packed.num_rows)))
  return packed


def _tokenizer_fingerprint(tokenizer) -> str:
  h = hashlib.sha256()
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:
    # The whole serialised pipeline: vocabulary, merges, pre-tokenizer, ...
    h.update(backend.to_str().encode("utf-8"))
  else:
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
  h.update(str(_eos_id(tokenizer)).encode("utf-8"))
  return h.hexdigest()


def _hash_text(h, text: str) -> None:
  """Adds one document to a domain's digest, length-prefixed so that moving
  a document boundary changes the digest."""
  b = text.encode("utf-8")
  h.update(b"%d:" % len(b))
  h.update(b)


def _content_fingerprint(tokenizer_fp: str, seq_len: int,
                         domains: Sequence[tuple[str, int, str]], drop_short: bool) -> str:
  """The packing fingerprint from ``(name, documents, text digest)`` per
  domain, in domain order: the one definition for documents in memory
  (:func:`packing_cache_key`) and documents streamed from a split
  (:func:`pack_split_cached`), which digest each domain's texts on the way."""
  h = hashlib.sha256(f"v{_CACHE_VERSION}|L={seq_len}|tok={tokenizer_fp}".encode("utf-8"))
  for name, n_docs, digest in domains:
    b = name.encode("utf-8")
    h.update(b"D%d:" % len(b) + b + b"n%d:" % n_docs + digest.encode("ascii"))
  if drop_short:  # another result for the same texts
    h.update(b"|drop_short")
  return h.hexdigest()


def packing_cache_key(docs_by_domain: Mapping[str, Sequence[str]], tokenizer,
                      seq_len: int, *, drop_short: bool = False) -> str:
  """Hex digest naming the packing of these texts with this tokenizer.

  Hashes the texts themselves (each length-prefixed, so document boundaries
  count), the domain names and order, the tokenizer's serialised pipeline,
  ``seq_len``, ``drop_short`` and the cache format version. It is the
  ``PackedDomains.fingerprint`` of a packing: the same documents give the
  same value whether they were packed from memory (:func:`pack_domains_cached`)
  or streamed from files or a HuggingFace dataset (:func:`pack_split_cached`).
  """
  domains = []
  for name, docs in docs_by_domain.items():
    h = hashlib.sha256()
    for text in docs:
      _hash_text(h, text)
    domains.append((name, len(docs), h.hexdigest()))
  return _content_fingerprint(_tokenizer_fingerprint(tokenizer), seq_len, domains, drop_short)


def _load_packed(folder: Path, seq_len: int) -> tuple[PackedDomains, dict]:
  meta = json.loads((folder / "meta.json").read_text())
  if meta["seq_len"] != seq_len or meta.get("version") != _CACHE_VERSION:
    raise ValueError("seq_len or cache version mismatch")
  # Memory-mapped: a start-up reads only the pages the batches touch, and the
  # rows are never copied into this process's memory as a whole.
  rows = [np.load(folder / f"domain_{i:04d}.npy", allow_pickle=False, mmap_mode="r")
          for i in range(len(meta["names"]))]
  return PackedDomains(names=list(meta["names"]), rows=rows,
                       tokens_per_domain=list(meta["tokens_per_domain"]),
                       seq_len=seq_len, fingerprint=meta["fingerprint"]), meta


def _cached(folder: Path, seq_len: int) -> tuple[PackedDomains, dict] | None:
  """The entry in ``folder`` with its ``meta.json``; None when there is
  none, or it does not load (removed, to be rebuilt)."""
  if not folder.is_dir():
    return None
  try:
    return _load_packed(folder, seq_len)
  except (OSError, ValueError, KeyError) as e:
    logger.warning("packing cache %s is unusable (%s); rebuilding", folder, e)
    shutil.rmtree(folder, ignore_errors=True)
    return None


def _write_entry(folder: Path, write) -> None:
  """Runs ``write(tmp)`` in a temporary folder beside ``folder`` and renames
  it into place, so a crash never leaves a half-written entry that a later
  run would trust."""
  folder.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
  try:
    write(tmp)
    try:
      os.rename(tmp, folder)
    except OSError:
      # Another process put the same entry in place first; its content is
      # the same by construction of the key.
      pass
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def pack_domains_cached(docs_by_domain: Mapping[str, Sequence[str]], tokenizer,
                        seq_len: int, cache_dir: str | os.PathLike, *,
                        drop_short: bool = False) -> PackedDomains:
  """:func:`pack_domains` of documents in memory, memoised on disk.

  The packing is stored in ``cache_dir/packed-<key>/`` (``meta.json`` and one
  ``domain_XXXX.npy`` per domain), where ``key`` is
  :func:`packing_cache_key`: any change to a text, the domains, the tokenizer
  or ``seq_len`` gives a new folder. The folder is written under a temporary
  name and renamed into place; an entry that fails to load is rebuilt. For
  a corpus on disk, :func:`pack_split_cached` finds its entry without
  reading the documents.

  Args and Returns: as :func:`pack_domains`, plus ``cache_dir``.
  """
  key = packing_cache_key(docs_by_domain, tokenizer, seq_len, drop_short=drop_short)
  folder = Path(cache_dir) / f"packed-{key[:32]}"
  hit = _cached(folder, seq_len)
  if hit is not None:
    logger.info("loaded packed rows from %s", folder)
    return hit[0]
  packed = dataclasses.replace(pack_domains(docs_by_domain, tokenizer, seq_len,
                                            drop_short=drop_short), fingerprint=key)

  def write(tmp: Path) -> None:
    for i, r in enumerate(packed.rows):
      np.save(tmp / f"domain_{i:04d}.npy", r, allow_pickle=False)
    (tmp / "meta.json").write_text(json.dumps({
        "names": packed.names, "tokens_per_domain": packed.tokens_per_domain,
        "seq_len": seq_len, "fingerprint": key, "version": _CACHE_VERSION}, indent=1))
  _write_entry(folder, write)
  return packed


# The .npy header of a streamed domain is written last, once its row count is
# known, into this many bytes reserved at the file's start: numpy pads a
# version 1.0 header to a multiple of 64 bytes, and the header of any 2-d
# int32 array whose shape has fewer than ~50 digits fits in 128.
_NPY_HEADER_BYTES = 128


class _DomainStream:
  """One domain's token stream, written to disk as its documents arrive.

  The stream goes to ``path`` after ``_NPY_HEADER_BYTES`` reserved bytes;
  :meth:`finish` cuts it to whole rows and writes the header, so the file
  becomes the domain's ``(N_d, L + 1)`` int32 ``.npy`` without a copy.
  """

  def __init__(self, path: Path):
    self.path = path
    self.file = open(path, "wb")  # pylint: disable=consider-using-with
    self.file.write(b"\0" * _NPY_HEADER_BYTES)
    self.pending: list[str] = []  # documents not encoded yet
    self.docs = 0
    self.tokens = 0
    self.digest = hashlib.sha256()

  def add(self, text: str, encode, eos: int) -> None:
    _hash_text(self.digest, text)
    self.docs += 1
    self.pending.append(text)
    if len(self.pending) >= _ENCODE_CHUNK:
      self.flush(encode, eos)

  def flush(self, encode, eos: int) -> None:
    if not self.pending:
      return
    stream_T = _token_stream(self.pending, encode, eos)
    stream_T.tofile(self.file)
    self.tokens += int(stream_T.shape[0])
    self.pending = []

  def finish(self, width: int, out: Path | None) -> int:
    """Rows ``N_d`` written to ``out`` (the file is removed when ``out`` is None)."""
    n = self.tokens // width
    if out is None:
      self.file.close()
      self.path.unlink()
      return n
    self.file.truncate(_NPY_HEADER_BYTES + n * width * 4)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(np.dtype("<i4")),
                 "fortran_order": False, "shape": (n, width)})
    if len(header.getvalue()) != _NPY_HEADER_BYTES:
      raise AssertionError(f"an .npy header of {len(header.getvalue())} bytes for shape "
                           f"{(n, width)}; {_NPY_HEADER_BYTES} were reserved")
    self.file.seek(0)
    self.file.write(header.getvalue())
    self.file.close()
    self.path.rename(out)
    return n


def _stream_split(source, tokenizer, seq_len: int, drop_short: bool, tmp: Path) -> dict:
  """Streams ``source``'s documents into ``tmp/domain_XXXX.npy``; returns
  the entry's meta (without its key).

  Memory: at most ``_ENCODE_CHUNK`` pending documents per domain and one
  chunk's encodings; the token streams go to disk as they grow.
  """
  eos = _eos_id(tokenizer)
  encode = _encoder(tokenizer)
  width = seq_len + 1
  skips = corpus.SkipCounts()
  seen: set[str] = set()
  streams: dict[str, _DomainStream] = {}
  try:
    for domain, text in source.documents(skips, seen):
      if domain not in streams:
        streams[domain] = _DomainStream(tmp / f"stream_{len(streams):04d}.bin")
      streams[domain].add(text, encode, eos)
    for s in streams.values():
      s.flush(encode, eos)
    corpus.check_documents(source.where, {d: s.docs for d, s in streams.items()}, seen, skips,
                           domain_field=source.domain_field, text_field=source.text_field)
    names, tokens, docs, digests, left_out = [], [], {}, [], []
    for name in sorted(streams):  # the position of a name is a stable domain id
      s = streams[name]
      docs[name] = s.docs
      digests.append((name, s.docs, s.digest.hexdigest()))
      if s.tokens < width:
        _too_short(name, s.tokens, s.docs, width, drop_short)
        s.finish(width, None)
        left_out.append(name)
        continue
      s.finish(width, tmp / f"domain_{len(names):04d}.npy")
      names.append(name)
      tokens.append(s.tokens)
  finally:
    for s in streams.values():
      s.file.close()
  rows = [t // width for t in tokens]
  logger.info("packed %d domains into rows of %d tokens: %s", len(names), width,
              ", ".join(f"{n}={r}" for n, r in zip(names, rows)))
  # Over every domain read, those left out included: packing_cache_key of
  # read_split's documents, whichever way they were packed.
  fingerprint = _content_fingerprint(_tokenizer_fingerprint(tokenizer), seq_len, digests,
                                     drop_short)
  return {"names": names, "tokens_per_domain": tokens, "seq_len": seq_len,
          "fingerprint": fingerprint, "version": _CACHE_VERSION, "documents": docs,
          "left_out": left_out, "skips": skips.as_dict(), "source": source.where}


def pack_split_cached(source, tokenizer, seq_len: int, cache_dir: str | os.PathLike, *,
                      drop_short: bool = False) -> tuple[PackedDomains, corpus.SkipCounts]:
  """Packs one split of a corpus on disk, once: later calls read no document.

  The entry is found by a key computed from the split's metadata alone:
  ``source.signature()`` (for files: their relative paths, sizes and
  modification times, and the text and domain field options; for a
  HuggingFace dataset: its arrow cache files), the tokenizer's serialised
  pipeline, ``seq_len``, ``drop_short`` and the cache format version. A
  start with a valid entry therefore opens the memory-mapped rows and reads
  no record; a changed, added or removed file gives a new entry (old
  entries are left for the user to delete).

  On a miss the documents are streamed (``source.documents``), encoded in
  chunks and written to disk domain by domain (:class:`_DomainStream`), so
  neither the texts nor the token streams are ever held whole in memory.
  The rows are exactly those of :func:`pack_domains` on the documents of
  :func:`~dograph_jax.data.corpus.read_split` (domains sorted by name, each
  domain's documents in file order), and the entry's ``meta.json`` keeps
  what reading found: documents per domain, the skipped records by reason
  (logged again on every hit), the domains left out as too short, and the
  fingerprint.

  ``PackedDomains.fingerprint`` is content-based (:func:`packing_cache_key`
  of the documents read, computed while streaming): the same documents give
  the same fingerprint whatever their files, format or modification times,
  and a resumed run compares it (``single_run.check_corpus``).

  Args:
    source: a split source, e.g. :class:`~dograph_jax.data.corpus.FileSplit`
      or :class:`~dograph_jax.data.hf.HFSplit` (``where``, ``signature()``,
      ``documents(skips, seen)``, ``domain_field``, ``text_field``).
    tokenizer: a transformers tokenizer with an eos token.
    seq_len: ``L``.
    cache_dir: folder of the entries (``packed-<key>/``), created if needed.
    drop_short: leave out, with a warning, a domain shorter than one row
      instead of raising (as :func:`pack_domains`).

  Returns:
    ``(packed, skips)``: the memory-mapped :class:`PackedDomains` and the
    :class:`~dograph_jax.data.corpus.SkipCounts` of the reading that built
    the entry.

  Raises:
    FileNotFoundError, ValueError: as ``read_split`` and :func:`pack_domains`
      (on a miss; a hit raises nothing about the documents, which were
      checked when the entry was built).
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be positive, got {seq_len}")
  payload = {"version": _CACHE_VERSION, "source": source.signature(),
             "tokenizer": _tokenizer_fingerprint(tokenizer), "seq_len": seq_len,
             "drop_short": bool(drop_short)}
  key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()
  folder = Path(cache_dir) / f"packed-{key[:32]}"
  hit = _cached(folder, seq_len)
  if hit is None:
    logger.info("%s: no packed rows in %s yet; reading and packing the split", source.where,
                cache_dir)

    def write(tmp: Path) -> None:
      meta = _stream_split(source, tokenizer, seq_len, drop_short, tmp)
      (tmp / "meta.json").write_text(json.dumps({**meta, "key": key}, indent=1))
    _write_entry(folder, write)
    hit = _cached(folder, seq_len)
    if hit is None:
      raise OSError(f"the packed rows just written to {folder} cannot be read back")
    return hit[0], corpus.SkipCounts(collections.Counter(hit[1]["skips"]))
  packed, meta = hit
  skips = corpus.SkipCounts(collections.Counter(meta["skips"]))
  log = logger.warning if skips.total else logger.info
  log("%s: packed rows from %s (%d documents in %d domains%s; skipped %d when read: %s)",
      source.where, folder, sum(meta["documents"].values()), len(meta["documents"]),
      f", left out as shorter than a row: {meta['left_out']}" if meta["left_out"] else "",
      skips.total, skips)
  return packed, skips


# --------------------------------------------------------------------------
# Mixture proportions.


def natural_proportions(packed: PackedDomains) -> dict[str, float]:
  """Each domain's share of all tokens (``tokens_per_domain``), by name."""
  total = sum(packed.tokens_per_domain)
  return {n: t / total for n, t in zip(packed.names, packed.tokens_per_domain)}


def uniform_proportions(packed: PackedDomains) -> dict[str, float]:
  """The same share for every domain."""
  return {n: 1.0 / len(packed.names) for n in packed.names}


def resolve_proportions(packed: PackedDomains,
                        proportions: Mapping[str, float] | str,
                        ) -> dict[str, float]:
  """Validated, normalised proportions in ``packed.names`` order.

  Args:
    packed: the domains to mix.
    proportions: ``"natural"`` (by token count), ``"uniform"``, or a mapping
      from every domain name to a positive finite weight (normalised here).

  Raises:
    ValueError: an unknown keyword, a missing or unknown domain name, or a
      weight that is zero, negative or not finite. (grain's mixer rejects
      zero weights; to leave a domain out, use ``packed.subset``.)
  """
  if isinstance(proportions, str):
    if proportions == "natural":
      return natural_proportions(packed)
    if proportions == "uniform":
      return uniform_proportions(packed)
    raise ValueError(f"proportions must be 'natural', 'uniform' or a mapping "
                     f"name -> weight, got {proportions!r}")
  if not isinstance(proportions, Mapping):
    raise TypeError("proportions must be 'natural', 'uniform' or a mapping "
                    f"name -> weight, got {type(proportions).__name__}")
  unknown = sorted(set(proportions) - set(packed.names))
  missing = [n for n in packed.names if n not in proportions]
  if unknown or missing:
    raise ValueError(f"proportions name unknown domain(s) {unknown} and miss "
                     f"domain(s) {missing}; domains are {packed.names}")
  weights = {}
  for n in packed.names:
    w = float(proportions[n])
    if not math.isfinite(w) or w <= 0:
      raise ValueError(
          f"proportion of domain {n!r} is {proportions[n]!r}; every weight "
          "must be positive and finite (use packed.subset to drop a domain)")
    weights[n] = w
  total = sum(weights.values())
  return {n: w / total for n, w in weights.items()}


# --------------------------------------------------------------------------
# Training iterator.


class _WithDomainId:
  """Row -> ``{"tokens", "domain_id"}``; a class so that it pickles (for
  grain's multiprocessing prefetch)."""

  def __init__(self, domain_id: int):
    self.domain_id = np.int32(domain_id)

  def __call__(self, row_T: np.ndarray) -> dict[str, np.ndarray]:
    return {"tokens": row_T, "domain_id": self.domain_id}


def _domain_seed(seed: int, name: str) -> int:
  # Keyed by the name, not the position, so adding or dropping a domain does
  # not change the row order of the others.
  return int(np.random.SeedSequence(
      [seed, zlib.crc32(name.encode("utf-8"))]).generate_state(1)[0])


def _check_shard(batch_size: int, shard_index: int, shard_count: int,
                 packed: PackedDomains) -> int:
  """Validates a host shard; returns the local batch size ``B / shard_count``."""
  # grain's own validation of the index and count (clear messages).
  grain.sharding.ShardOptions(shard_index=shard_index, shard_count=shard_count)
  if batch_size % shard_count:
    raise ValueError(
        f"batch_size {batch_size} (the global batch) is not divisible by "
        f"shard_count {shard_count}; every host must load the same number of "
        f"rows per step. Use a multiple of {shard_count}.")
  small = {n: r for n, r in zip(packed.names, packed.num_rows) if r < shard_count}
  if small:
    raise ValueError(
        f"domain(s) {small} have fewer rows than the {shard_count} shards; "
        "every host needs at least one row of every domain it mixes")
  return batch_size // shard_count


def _domain_datasets(packed: PackedDomains, seed: int, shard_index: int,
                     shard_count: int) -> list[grain.IterDataset]:
  """Per domain, the endless shuffled stream of this host's rows, tagged
  with the domain id (see :func:`make_train_iterator` for the sharding)."""
  # Rows are in memory already: reader threads would only contend for the GIL
  # (grain's own advice for in-memory sources).
  read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  datasets = []
  for d, (name, rows) in enumerate(zip(packed.names, packed.rows)):
    # The same seed on every host: all hosts shuffle a domain the same way,
    # and each keeps every shard_count-th row of that order (grain's idiom
    # for sharding, ``ds[shard_index::shard_count]``), so the hosts' rows
    # are disjoint and together they read the single-host stream.
    ds = grain.MapDataset.source(rows).shuffle(seed=_domain_seed(seed, name))
    if shard_count > 1:
      # Shuffle before slicing, not after: slicing the source would give each
      # host a fixed, strided subset for ever (rows r, r + n, ... -- and
      # neighbouring rows, windows of one document, in every global batch).
      # A slice maps epoch e of its own to epoch e of the shuffle (grain's
      # SliceMapDataset adds e * len(parent)), so each epoch every host takes
      # its part of that epoch's permutation. Stopping at a multiple of
      # shard_count gives every host the same epoch length, so hosts that
      # draw the same number of rows per step (they do: same mixing weights,
      # same local batch) stay in the same epoch and never share a row; the
      # N_d mod shard_count rows left over change with every epoch's shuffle.
      stop = rows.shape[0] // shard_count * shard_count
      ds = ds[shard_index:stop:shard_count]
    ds = (ds.repeat()  # reshuffled every epoch; mix stops when any part ends
          .map(_WithDomainId(d))
          .to_iter_dataset(read_options))
    datasets.append(ds)
  return datasets


def _check_batch_and_seed(batch_size: int, seed: int) -> None:
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if seed < 0:
    raise ValueError(f"seed must be non-negative, got {seed}")


def make_train_dataset(packed: PackedDomains, batch_size: int, *,
                       proportions: Mapping[str, float] | str, seed: int,
                       shard_index: int = 0, shard_count: int = 1,
                       ) -> grain.IterDataset:
  """The infinite, mixed, batched training dataset (see
  :func:`make_train_iterator`); use this to add e.g. ``mp_prefetch``."""
  _check_batch_and_seed(batch_size, seed)
  local_batch_size = _check_shard(batch_size, shard_index, shard_count, packed)
  weights = resolve_proportions(packed, proportions)
  datasets = _domain_datasets(packed, seed, shard_index, shard_count)
  mixed = grain.IterDataset.mix(datasets, [weights[n] for n in packed.names])
  return mixed.batch(local_batch_size, drop_remainder=True)


def make_train_iterator(packed: PackedDomains, batch_size: int, *,
                        proportions: Mapping[str, float] | str, seed: int,
                        shard_index: int = 0, shard_count: int = 1,
                        ) -> grain.DatasetIterator:
  """An endless, deterministic, checkpointable iterator of training batches.

  Each domain's rows are shuffled (seeded by ``seed`` and the domain's name),
  repeated for ever with a fresh shuffle each epoch, and tagged with the
  domain id; grain's ``IterDataset.mix`` then interleaves the domains.
  grain's mix is a deterministic interleaving, not a random draw: after ``n``
  rows each domain has contributed its share of ``n`` up to rounding (the
  weights are first rounded to integers with the smallest scaled to 100), so
  the domain counts of every batch are close to ``B * proportion`` (a
  stratified batch, not a multinomial one).

  Several hosts (``shard_count > 1``, normally ``jax.process_index()`` and
  ``jax.process_count()``, see ``dograph_jax/train/distributed.py``): every host
  builds this iterator with the same arguments and its own
  ``shard_index``, and gets ``B / shard_count`` rows per step. Each domain's
  per-epoch permutation is the same on every host, and host ``i`` takes
  positions ``i, i + n, i + 2n, ...`` of it (``n = shard_count``; the last
  ``N_d mod n`` positions of each epoch are skipped, other rows each epoch).
  Hence, at every step:

  * the hosts' rows are disjoint (also across epoch boundaries), and over an
    epoch they cover the domain (but for those ``N_d mod n`` rows);
  * every host's batch has the same domain counts, those of the
    single-host mix at batch size ``B / n`` (each close to
    ``B / n * proportion``); their union, the global batch, has ``n`` times
    those counts: the global batch is stratified as a whole;
  * the union is a batch of the single-host stream: its rows of domain ``d``
    are the next ``n * c_d`` rows of the single-host (``shard_count=1``)
    shuffle of ``d``. When ``N_d`` is divisible by ``n`` for every domain and
    the mix's per-batch counts are the same at ``B / n`` and ``B`` (e.g.
    weights whose rounded pattern divides ``B / n``), the union of the
    hosts' step-``t`` batches is exactly the single-host step-``t`` batch,
    as a set of rows.
  * the iterator states of all hosts are equal after the same number of
    steps (they count positions, not rows), so one saved state resumes every
    host exactly.

  Cost: grain's shuffle is a stateless index permutation (nothing to
  checkpoint) whose cost per row falls with the domain's size, about
  25 ms / N for N rows (measured here: 5 ms at N = 5, 0.7 ms at N = 40,
  35 us at N = 1000): negligible from a few hundred rows on.

  ``iterator.get_state()`` is a small dict of ints and bools that survives
  ``json.loads(json.dumps(state))``; ``set_state`` on an iterator of the same
  dataset (same arguments, shard included) restores the exact position (see
  :func:`iterator_state_to_json`).

  Args:
    packed: training rows (every host holds all of them: they are only
      indexed, never copied, by the shard).
    batch_size: ``B``, the global batch (over all shards).
    proportions: ``"natural"``, ``"uniform"`` or a mapping name -> weight
      (see :func:`resolve_proportions`).
    seed: non-negative int; the same seed gives the same batches.
    shard_index: this host's shard, in ``[0, shard_count)``.
    shard_count: number of hosts loading disjoint parts; 1 (default) loads
      everything, exactly as before sharding existed.

  Returns:
    A ``grain.DatasetIterator`` of ``{"tokens": (B / shard_count, L + 1)
    int32, "domain_id": (B / shard_count,) int32}``.

  Raises:
    ValueError: ``batch_size`` not divisible by ``shard_count``, a bad
      shard index or count, or a domain with fewer rows than shards.
  """
  return iter(make_train_dataset(packed, batch_size, proportions=proportions,
                                 seed=seed, shard_index=shard_index,
                                 shard_count=shard_count))


# --------------------------------------------------------------------------
# Proportions that change during a run.

# Proportions become integer interleaving weights as in grain's mix: the
# smallest positive one scaled to this and the others in proportion,
# truncated. Hence a run whose proportions never change draws exactly the
# batches of make_train_iterator.
_SMALLEST_WEIGHT = 100
# A proportion below this fraction of the largest counts as 0 (never drawn):
# it bounds the integer weights, and the interleaving's period, to ~1e8.
_NEGLIGIBLE = 1e-6
# Mixed into the seed of a new segment's phase (any fixed constant).
_PHASE_TAG = 0x5A3D


def integer_weights(proportions_D) -> tuple[int, ...]:
  """Integer interleaving weights of ``(D,)`` non-negative proportions.

  The smallest proportion above ``1e-6 x`` the largest becomes 100 and the
  others scale with it (truncated), as grain's ``IterDataset.mix`` does; the
  others are 0.

  Raises:
    ValueError: a NaN, infinite or negative proportion, or none positive.
  """
  p = np.asarray(proportions_D, np.float64).reshape(-1)
  if not np.all(np.isfinite(p)) or np.any(p < 0) or not np.any(p > 0):
    raise ValueError(f"sampling proportions must be finite, >= 0 and not all 0, got "
                     f"{p.tolist()}")
  positive = p > _NEGLIGIBLE * p.max()
  scale = _SMALLEST_WEIGHT / p[positive].min()
  return tuple(int(x * scale) if keep else 0 for x, keep in zip(p, positive))


def interleave_domain(k: int, weights: Sequence[int]) -> int:
  """The domain of element ``k`` of the deterministic interleaving of
  domains with integer ``weights`` (grain's mix, any weight may be 0).

  Definition: among the first ``k`` elements, domain 0 has
  ``k - floor(k (S - w_0) / S)`` (``S = sum w``); the
  ``floor(k (S - w_0) / S)`` others are the interleaving of domains
  ``1, 2, ...`` alone, recursively. Element ``k`` belongs to the first
  domain whose count grows from ``k`` to ``k + 1``. Every window of ``S``
  consecutive elements holds exactly ``w_d`` of domain ``d``, and any
  window of ``n`` elements within one of ``n w_d / S`` rounded up or down
  (for the first domain; the later ones are nested, within a few).
  """
  total = int(sum(weights))
  before, after = k, k + 1  # positions k and k + 1 among the remaining domains
  for d, w in enumerate(weights):
    rest = total - w
    before_rest, after_rest = before * rest // total, after * rest // total
    if after - after_rest != before - before_rest:
      return d
    before, after, total = before_rest, after_rest, rest
  raise AssertionError(f"no domain for element {k} of weights {tuple(weights)}")


class DynamicMixIterator:
  """Training batches drawn with domain proportions that may change each step.

  The sampler of the ``sample`` form of the online mixers
  (``--apply_weights``): before drawing the batch of step ``t`` the trainer
  calls :meth:`set_proportions` with the method's current proportions.

  **Draw.** Rows come from the same per-domain streams as
  :func:`make_train_iterator` (shuffled by seed and domain name, repeated,
  sharded across hosts alike); which domain supplies each of a batch's rows
  follows the interleaving of :func:`interleave_domain` for the current
  integer weights (:func:`integer_weights`). The position in that
  interleaving runs on across batches while the weights stay the same: a
  run whose proportions never change gets exactly the batches of
  :func:`make_train_iterator` (same rows, same order). When the weights
  change, a new segment of the interleaving starts at a phase drawn from
  ``(seed, batch number)``, uniform over the interleaving's period; a
  domain's expected rows per batch are then exactly ``b p_d`` (``b`` the
  local batch), and every draw is within one or two rows of it (no rounding
  bias towards the first domains, which a restart at phase 0 would have).

  **Determinism.** The counts of every batch depend only on the seed, the
  batch number and the proportions passed in, so a resumed run (same
  proportions, restored from the checkpointed method state) draws the same
  batches, and every host of a multi-host run draws the same domain counts
  from its own disjoint rows (``shard_index``/``shard_count``, as in
  :func:`make_train_iterator`): the global batch holds ``shard_count`` times
  the local counts.

  **State.** :meth:`get_state` is a JSON-safe dict (per-domain stream
  positions, the integer weights, the interleaving position and the batch
  number); :meth:`set_state` on an iterator built with the same arguments
  restores it exactly.

  Args:
    packed, batch_size, seed, shard_index, shard_count: as
      :func:`make_train_iterator`.
    proportions: the starting proportions (``"natural"``, ``"uniform"`` or a
      mapping, :func:`resolve_proportions`).

  Yields:
    ``{"tokens": (B / shard_count, L + 1) int32, "domain_id": (B /
    shard_count,) int32}``.
  """

  def __init__(self, packed: PackedDomains, batch_size: int, *,
               proportions: Mapping[str, float] | str, seed: int,
               shard_index: int = 0, shard_count: int = 1):
    _check_batch_and_seed(batch_size, seed)
    self._local_batch = _check_shard(batch_size, shard_index, shard_count, packed)
    self._names = list(packed.names)
    self._seed = seed
    start = resolve_proportions(packed, proportions)
    self._domains = [iter(ds) for ds in
                     _domain_datasets(packed, seed, shard_index, shard_count)]
    self._weights = integer_weights([start[n] for n in self._names])
    self._index = 0     # position in the current segment's interleaving
    self._batches = 0   # batches drawn so far

  @property
  def weights(self) -> tuple[int, ...]:
    """The integer interleaving weights in use (domain order)."""
    return self._weights

  def set_proportions(self, proportions) -> None:
    """Sets the proportions of the next batches: ``(D,)`` in domain order, or
    a mapping from every domain name (normalised; zeros allowed).

    Raises:
      ValueError: a wrong length or unknown/missing names, or proportions
        that are not finite, non-negative and not all zero.
    """
    if isinstance(proportions, Mapping):
      if set(proportions) != set(self._names):
        raise ValueError(f"proportions name {sorted(proportions)}; the domains are "
                         f"{self._names}")
      proportions = [proportions[n] for n in self._names]
    p = np.asarray(proportions, np.float64).reshape(-1)
    if p.shape[0] != len(self._names):
      raise ValueError(f"{p.shape[0]} proportions for {len(self._names)} domains "
                       f"{self._names}")
    weights = integer_weights(p)
    if weights != self._weights:
      self._weights = weights
      period = sum(weights)
      # A phase uniform over the period: unbiased counts (class docstring).
      state = np.random.SeedSequence([self._seed, self._batches, _PHASE_TAG]).generate_state(
          2, np.uint64)
      self._index = (int(state[0]) << 64 | int(state[1])) % period

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = [next(self._domains[interleave_domain(self._index + j, self._weights)])
            for j in range(self._local_batch)]
    self._index += self._local_batch
    self._batches += 1
    return {key: np.stack([r[key] for r in rows]) for key in rows[0]}

  def get_state(self) -> dict[str, Any]:
    return {"domains": [it.get_state() for it in self._domains],
            "weights": list(self._weights), "index": self._index,
            "batches": self._batches}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if len(state["domains"]) != len(self._domains):
      raise ValueError(f"the saved sampler state has {len(state['domains'])} domains, "
                       f"this corpus {len(self._domains)} ({self._names})")
    for it, s in zip(self._domains, state["domains"]):
      it.set_state(s)
    self._weights = tuple(int(w) for w in state["weights"])
    self._index = int(state["index"])
    self._batches = int(state["batches"])


def iterator_state_to_json(state: Mapping[str, Any]) -> str:
  """Serialises a grain iterator state, refusing one that JSON would alter.

  The states of :func:`make_train_iterator` are plain ints and bools and pass
  unchanged. The check guards against pipelines whose state holds tuples
  (turned into lists, as in grain's ``ConcatThenSplitIterDataset``) or bytes
  (not serialisable): restoring such a state could silently resume at a
  different position.

  Raises:
    ValueError: the state does not survive a JSON round trip unchanged.
  """
  try:
    text = json.dumps(state, sort_keys=True)
  except TypeError as e:
    raise ValueError(f"iterator state is not JSON-serialisable: {e}") from e
  # Equality is strict enough: a tuple never equals the list JSON returns,
  # nor an int key the string key.
  if json.loads(text) != state:
    raise ValueError("iterator state changes under a JSON round trip "
                     "(tuples, non-string keys, ...); it cannot be restored "
                     "exactly from JSON")
  return text


def iterator_state_from_json(text: str) -> dict[str, Any]:
  """Inverse of :func:`iterator_state_to_json`."""
  return json.loads(text)


# --------------------------------------------------------------------------
# Validation batches.


def make_eval_batches(packed_val: PackedDomains, batch_size: int, *,
                      max_rows_per_domain: int | None = None,
                      domain_names: Sequence[str] | None = None,
                      ) -> dict[str, list[dict[str, np.ndarray]]]:
  """Fixed per-domain validation batches, each row used exactly once.

  Rows are taken in order (the first ``max_rows_per_domain`` of each domain
  when given). The last batch of a domain is padded to ``B`` rows with
  zeros; every batch carries a ``"mask"`` so that all batches have the same
  keys and shapes (one compilation of the eval step) and padded rows can be
  left out of the loss.

  Args:
    packed_val: validation rows.
    batch_size: ``B``.
    max_rows_per_domain: cap on the rows used per domain (None: all).
    domain_names: the id order to use for ``domain_id``, normally the
      training ``PackedDomains.names``, so that ids agree between train and
      validation even when the validation split lacks a domain. Default:
      ``packed_val.names``.

  Returns:
    Domain name -> list of ``{"tokens": (B, L + 1) int32, "domain_id": (B,)
    int32, "mask": (B,) bool}``; ``mask`` is False on padding rows.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if max_rows_per_domain is not None and max_rows_per_domain < 1:
    raise ValueError(f"max_rows_per_domain must be positive, got "
                     f"{max_rows_per_domain}")
  ids = {n: i for i, n in enumerate(domain_names or packed_val.names)}
  unknown = [n for n in packed_val.names if n not in ids]
  if unknown:
    raise ValueError(f"validation domain(s) {unknown} are not in "
                     f"domain_names {list(domain_names or [])}")
  width = packed_val.seq_len + 1
  out = {}
  for name, rows in zip(packed_val.names, packed_val.rows):
    if max_rows_per_domain is not None:
      rows = rows[:max_rows_per_domain]
    batches = []
    for start in range(0, rows.shape[0], batch_size):
      chunk = rows[start:start + batch_size]
      n = chunk.shape[0]
      tokens_BxT = np.zeros((batch_size, width), np.int32)
      tokens_BxT[:n] = chunk
      mask_B = np.zeros((batch_size,), bool)
      mask_B[:n] = True
      batches.append({
          "tokens": tokens_BxT,
          "domain_id": np.full((batch_size,), ids[name], np.int32),
          "mask": mask_B,
      })
    out[name] = batches
  return out
