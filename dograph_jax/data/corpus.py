"""Reading a multi-domain text corpus from disk.

Layout: ``data_dir/<split>/`` (``train``, ``validation``) holds, at any depth,
files of one of these kinds:

* ``*.jsonl`` — one JSON object per line;
* ``*.jsonl.gz``, ``*.json.gz`` — the same, gzip-compressed (C4 and many
  SlimPajama mirrors ship JSON lines as ``.json.gz``), streamed line by line;
* ``*.parquet`` — one record per row, read in record batches with pyarrow.

Two record schemas are understood, and may be mixed:

* SlimPajama / RedPajama:
  ``{"text": ..., "meta": {"redpajama_set_name": "RedPajamaC4"}}``;
* plain: ``{"text": ..., "domain": "c4"}``.

The domain is read from a dotted path
(``domain_field="meta.redpajama_set_name"`` or ``"domain"``); the default ``"auto"`` tries the SlimPajama path first, then
``domain``. A nested level stored as a JSON string (some parquet exports keep
``meta`` as a string column) is decoded on the way.

Bad input never stops reading: each bad record or file is skipped and counted
under one reason of :data:`SKIP_REASONS`, and :func:`read_split` logs one
summary line. Errors are raised only for problems a user must fix: a missing
directory, a split without files, a domain with no usable document, a parquet
file with none of the expected columns (a wrong field name, most likely,
which would otherwise skip every row of the file).

:func:`read_split` returns a split's documents in memory (tokenizer training
scripts, R&B's regrouping, tests). The trainer instead hands a
:class:`FileSplit` to :func:`~dograph_jax.data.pipeline.pack_split_cached`,
which finds the split's packed rows from the files' metadata and streams the
documents (:func:`iter_documents`) only to build them.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import logging
import os
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SLIMPAJAMA_DOMAIN_FIELD = "meta.redpajama_set_name"
PLAIN_DOMAIN_FIELD = "domain"
# Tried in this order, per record, when ``domain_field="auto"``.
AUTO_DOMAIN_FIELDS = (SLIMPAJAMA_DOMAIN_FIELD, PLAIN_DOMAIN_FIELD)

# Longest suffixes first, so ``x.jsonl.gz`` is not taken for something else.
FILE_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".parquet")

SKIP_REASONS = {
    "invalid_utf8": "a line that is not valid UTF-8, or a text with unpaired "
                    "surrogates (which cannot be written as UTF-8)",
    "invalid_json": "a line that is not valid JSON",
    "not_an_object": "a JSON value or row that is not an object",
    "missing_text": "no text field, or a null one",
    "non_string_text": "a text field that is not a string",
    "empty_text": "a text that is empty or only whitespace",
    "missing_domain": "no domain field, or a null one",
    "bad_domain": "a domain that is not a non-empty string",
    "unreadable_file": "a file that could not be opened (counted per file)",
    "empty_file": "a file of 0 bytes (counted per file)",
    "corrupt_file": "a file that could not be decoded to its end, e.g. a "
                    "truncated gzip stream or a damaged parquet file (counted "
                    "per file; the records read before the damage are kept)",
}


@dataclasses.dataclass
class SkipCounts:
  """What was skipped while reading, by reason (keys of :data:`SKIP_REASONS`).

  Reasons ending in ``_file`` count files; all others count records.
  """
  counts: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)

  def add(self, reason: str, n: int = 1) -> None:
    if reason not in SKIP_REASONS:
      raise KeyError(f"unknown skip reason {reason!r}")
    self.counts[reason] += n

  def update(self, other: SkipCounts) -> None:
    self.counts.update(other.counts)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def as_dict(self) -> dict[str, int]:
    """Non-zero counts, sorted by reason."""
    return {k: v for k, v in sorted(self.counts.items()) if v}

  def __getitem__(self, reason: str) -> int:
    return self.counts[reason]

  def __str__(self) -> str:
    if not self.total:
      return "nothing skipped"
    return ", ".join(f"{k}={v}" for k, v in self.as_dict().items())


def list_split_files(data_dir: str | os.PathLike, split: str) -> list[Path]:
  """Data files of one split, sorted by path for a stable reading order.

  Raises:
    FileNotFoundError: ``data_dir`` or ``data_dir/split`` does not exist.
    ValueError: the split folder holds no file of a known kind.
  """
  data_dir = Path(data_dir)
  if not data_dir.is_dir():
    raise FileNotFoundError(f"data directory {str(data_dir)!r} does not exist")
  split_dir = data_dir / split
  if not split_dir.is_dir():
    present = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    raise FileNotFoundError(
        f"split folder {str(split_dir)!r} does not exist (folders in "
        f"{str(data_dir)!r}: {present})")
  # A broken link or an unreadable entry with a data suffix is kept, so that
  # reading counts it as an unreadable file instead of silently ignoring it.
  files = sorted(
      p for p in split_dir.rglob("*")
      if p.name.endswith(FILE_SUFFIXES) and not p.is_dir())
  if not files:
    raise ValueError(
        f"no data files ({', '.join('*' + s for s in FILE_SUFFIXES)}) under "
        f"{str(split_dir)!r}")
  return files


def _parse_field_path(field: str) -> tuple[str, ...]:
  parts = tuple(field.split("."))
  if not field or not all(parts):
    raise ValueError(f"invalid field path {field!r}")
  return parts


def _lookup(record: Any, parts: Sequence[str]) -> Any:
  """``record[p0][p1]...``; None where a level is missing or not an object."""
  value = record
  for key in parts:
    if isinstance(value, str) and value.startswith("{"):
      # A nested object stored as a JSON string (parquet exports do this).
      try:
        value = json.loads(value)
      except ValueError:
        return None
    if not isinstance(value, dict):
      return None
    value = value.get(key)
  return value


def _iter_json_lines(stream, skips: SkipCounts) -> Iterator[Any]:
  """Parsed JSON values of a binary line stream; blank lines are ignored."""
  for raw in stream:
    if not raw.strip():
      continue
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError:
      skips.add("invalid_utf8")
      continue
    try:
      yield json.loads(line)
    except ValueError:
      skips.add("invalid_json")


def _describe_fields(fields: Mapping[str, Sequence[str]]) -> str:
  """``the text field 'text' and the domain field 'a' or 'b'``."""
  return " and ".join(f"the {what} field " + " or ".join(map(repr, paths))
                      for what, paths in fields.items())


def _iter_parquet_rows(f, path: Path, columns: set[str],
                       fields: Mapping[str, Sequence[str]] | None) -> Iterator[dict]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  parquet = pq.ParquetFile(f)
  names = parquet.schema_arrow.names
  present = [c for c in names if c in columns]
  expected = (_describe_fields(fields) if fields else
              "a column of " + ", ".join(map(repr, sorted(columns))))
  if not present:
    # Every row would be skipped (once counted as missing_domain, naming
    # neither the file nor its columns): a wrong field name or a file of
    # another dataset, which the user must fix.
    raise ValueError(
        f"parquet file {str(path)!r} has none of the expected columns: it has "
        f"{names}, expected {expected} (a dotted field reads the column named "
        "by its first part; choose the fields with domain_field / text_field)")
  for what, paths in (fields or {}).items():
    if not any(p.split(".")[0] in names for p in paths):
      # Not an error (the file's other field is there), but every row will be
      # skipped for this one: say which file, so the count can be traced.
      logger.warning("parquet file %s has no %s column (expected %s; it has "
                     "%s): each of its %d rows is skipped", path, what,
                     " or ".join(map(repr, paths)), names,
                     parquet.metadata.num_rows)
  for batch in parquet.iter_batches(batch_size=1024, columns=present):
    yield from batch.to_pylist()


# Errors that mean "this file's bytes cannot be decoded": gzip raises
# BadGzipFile (an OSError) on a bad header, EOFError when truncated and
# zlib.error on a damaged stream; pyarrow raises ArrowException subclasses.
def _decode_errors() -> tuple[type[BaseException], ...]:
  errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
  try:
    import pyarrow  # pylint: disable=g-import-not-at-top
    errors += (pyarrow.ArrowException,)
  except ImportError:
    pass
  return errors


def iter_file_records(path: str | os.PathLike, skips: SkipCounts, *,
                      columns: set[str] | None = None,
                      fields: Mapping[str, Sequence[str]] | None = None,
                      ) -> Iterator[Any]:
  """Raw records (usually dicts) of one data file, counting what is skipped.

  Args:
    path: a ``.jsonl``, ``.jsonl.gz``, ``.json.gz`` or ``.parquet`` file.
    skips: receives ``invalid_utf8``/``invalid_json`` per bad line and
      ``unreadable_file``/``empty_file``/``corrupt_file`` per bad file.
    columns: top-level fields to read from parquet (all others are ignored);
      by default the first parts of the ``fields``' paths.
    fields: what the columns are for, as dotted paths by role, e.g.
      ``{"text": ["text"], "domain": ["meta.redpajama_set_name", "domain"]}``;
      only used to name them in the error and warnings about parquet files.

  Yields:
    The parsed value of each line (JSON lines) or each row (parquet).

  Raises:
    ValueError: a parquet file has none of the ``columns``.
  """
  path = Path(path)
  if columns is None and fields:
    columns = {p.split(".")[0] for paths in fields.values() for p in paths}
  try:
    f = open(path, "rb")  # pylint: disable=consider-using-with
  except OSError as e:
    logger.warning("cannot open %s: %s", path, e)
    skips.add("unreadable_file")
    return
  with f:
    if os.fstat(f.fileno()).st_size == 0:
      # Often a failed download or copy; no format has a valid 0-byte file,
      # and a silent skip would hide a missing domain or shard.
      logger.warning("skipping %s: the file is empty (0 bytes)", path)
      skips.add("empty_file")
      return
    try:
      if path.name.endswith(".parquet"):
        yield from _iter_parquet_rows(f, path, columns or set(), fields)
      elif path.name.endswith(".gz"):
        with gzip.GzipFile(fileobj=f, mode="rb") as gz:
          yield from _iter_json_lines(gz, skips)
      else:
        yield from _iter_json_lines(f, skips)
    except _decode_errors() as e:
      logger.warning("cannot decode %s to its end: %s: %s", path,
                     type(e).__name__, e)
      skips.add("corrupt_file")


def _field_paths(domain_field: str, text_field: str):
  """``(domain paths, text path, fields by role)`` of the two field options."""
  text_parts = _parse_field_path(text_field)
  names = list(AUTO_DOMAIN_FIELDS if domain_field == "auto" else [domain_field])
  domain_paths = [_parse_field_path(f) for f in names]
  return domain_paths, text_parts, {"text": [text_field], "domain": names}


def record_columns(domain_field: str = "auto", text_field: str = "text") -> dict[str, list[str]]:
  """The dotted field paths a record is read through, by role
  (``{"text": [...], "domain": [...]}``): the first part of each is a
  top-level column of a parquet file or an arrow table."""
  return _field_paths(domain_field, text_field)[2]


def documents_of(records: Iterator[Any], skips: SkipCounts, *,
                 domain_field: str = "auto", text_field: str = "text",
                 seen_domains: set[str] | None = None) -> Iterator[tuple[str, str]]:
  """The usable ``(domain, text)`` pairs of raw records, in order.

  The one definition of a usable record, shared by the file reader and the
  HuggingFace ``datasets`` reader (:mod:`~dograph_jax.data.hf`), so that the
  same records give the same documents and the same skip counts.

  Args:
    records: raw records (usually dicts; anything else is counted as
      ``not_an_object``).
    skips: receives a count for every skipped record.
    domain_field, text_field, seen_domains: as :func:`iter_documents`.
  """
  domain_paths, text_parts, _ = _field_paths(domain_field, text_field)
  for record in records:
    if not isinstance(record, dict):
      skips.add("not_an_object")
      continue
    domain = None
    for parts in domain_paths:
      domain = _lookup(record, parts)
      if domain is not None:
        break
    if domain is None:
      skips.add("missing_domain")
      continue
    if not isinstance(domain, str) or not domain.strip():
      skips.add("bad_domain")
      continue
    if seen_domains is not None:
      seen_domains.add(domain)
    text = _lookup(record, text_parts)
    if text is None:
      skips.add("missing_text")
      continue
    if not isinstance(text, str):
      skips.add("non_string_text")
      continue
    if not text.strip():
      skips.add("empty_text")
      continue
    try:
      # JSON escapes can produce lone surrogates, which tokenizers reject
      # later; catch them here, where the record can still be skipped.
      text.encode("utf-8")
    except UnicodeEncodeError:
      skips.add("invalid_utf8")
      continue
    yield domain, text


def iter_documents(data_dir: str | os.PathLike, split: str, skips: SkipCounts,
                   *, domain_field: str = "auto", text_field: str = "text",
                   seen_domains: set[str] | None = None,
                   ) -> Iterator[tuple[str, str]]:
  """Streams the usable ``(domain, text)`` pairs of a split, in file order.

  Args:
    data_dir: corpus root holding ``<split>/``.
    split: split folder name, e.g. ``"train"``.
    skips: receives a count for every skipped record or file.
    domain_field: dotted path of the domain name, or ``"auto"``.
    text_field: dotted path of the text.
    seen_domains: if given, receives every valid domain name met, including
      those of records skipped for their text.

  Raises:
    FileNotFoundError, ValueError: as :func:`list_split_files`.
    ValueError: a parquet file has none of the text and domain columns.
  """
  files = list_split_files(data_dir, split)
  fields = record_columns(domain_field, text_field)
  records = (record for path in files
             for record in iter_file_records(path, skips, fields=fields))
  yield from documents_of(records, skips, domain_field=domain_field,
                          text_field=text_field, seen_domains=seen_domains)


@dataclasses.dataclass(frozen=True)
class FileSplit:
  """One split of a corpus folder (``data_dir/<split>/``), read only on demand.

  A *split source*: what :func:`~dograph_jax.data.pipeline.pack_split_cached`
  packs. Any object with the same three members is one (the HuggingFace
  reader, :class:`~dograph_jax.data.hf.HFSplit`, is the other):

  * ``where``: the split, named for messages;
  * ``signature()``: a JSON-able description of the split's data computed
    from metadata alone (file names, sizes, modification times), so that a
    packed cache can be found without reading a record;
  * ``documents(skips, seen_domains)``: the usable ``(domain, text)`` pairs,
    streamed (:func:`iter_documents`).
  """
  data_dir: str | os.PathLike
  split: str
  domain_field: str = "auto"
  text_field: str = "text"

  @property
  def where(self) -> str:
    return str(Path(self.data_dir) / self.split)

  def signature(self) -> dict[str, Any]:
    """The split's files as ``[relative path, size, mtime_ns]``, sorted by path.

    A changed, added or removed file changes it; so does touching a file
    (its mtime), which only costs a rebuild. The paths are relative to the
    split folder, so a corpus moved or copied with its times kept (``cp
    -p``, ``rsync -a``) keeps its signature. A file that cannot be stat'ed
    (a dangling link) is described by its link.

    Raises:
      FileNotFoundError, ValueError: as :func:`list_split_files`.
    """
    root = Path(self.data_dir) / self.split
    files = []
    for path in list_split_files(self.data_dir, self.split):
      try:
        st = path.stat()
      except OSError:
        st = path.lstat()
      files.append([path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
    return {"kind": "files", "split": self.split, "domain_field": self.domain_field,
            "text_field": self.text_field, "files": files}

  def documents(self, skips: SkipCounts, seen_domains: set[str] | None = None,
                ) -> Iterator[tuple[str, str]]:
    return iter_documents(self.data_dir, self.split, skips, domain_field=self.domain_field,
                          text_field=self.text_field, seen_domains=seen_domains)


def check_documents(where: str, counts: Mapping[str, int], seen: set[str],
                    skips: SkipCounts, *, domain_field: str, text_field: str) -> None:
  """Refuses a split read with nothing usable, then logs its one summary line.

  Args:
    where: the split, named in the messages.
    counts: documents kept per domain.
    seen: every valid domain name met (also of records skipped for their text).
    skips: what was skipped.
    domain_field, text_field: the options, named in the messages.

  Raises:
    ValueError: a domain whose every record was skipped, or no usable
      document at all.
  """
  empty = sorted(seen - {d for d, n in counts.items() if n})
  if empty:
    raise ValueError(
        f"domain(s) {empty} in {where!r} have no usable document (skipped: "
        f"{skips})")
  if not counts:
    raise ValueError(
        f"no usable document in {where!r} (domain_field={domain_field!r}, "
        f"text_field={text_field!r}; skipped: {skips})")
  log = logger.warning if skips.total else logger.info
  log("read %s: %d documents in %d domains; skipped %d (%s)", where, sum(counts.values()),
      len(counts), skips.total, skips)


def read_split(data_dir: str | os.PathLike, split: str, *,
               domain_field: str = "auto", text_field: str = "text",
               ) -> tuple[dict[str, list[str]], SkipCounts]:
  """Reads one split into documents grouped by domain.

  Args:
    data_dir: corpus root; documents are read from ``data_dir/split`` and all
      folders below it.
    split: ``"train"``, ``"validation"``, ...
    domain_field: dotted path of the domain name in a record
      (``"meta.redpajama_set_name"``, ``"domain"``), or ``"auto"`` to try the
      SlimPajama path, then ``"domain"``.
    text_field: dotted path of the document text.

  Returns:
    ``(docs_by_domain, skips)``: ``docs_by_domain`` maps each domain name to
    its documents in file order, with the domains sorted by name (so the
    position of a name is a stable domain id); ``skips`` counts what was
    skipped, by reason. One summary line is logged.

  Raises:
    FileNotFoundError: ``data_dir`` or its split folder does not exist.
    ValueError: the split has no data files, no usable document at all, a
      domain whose every record was skipped, or a parquet file with none of
      the text and domain columns.
  """
  skips = SkipCounts()
  seen: set[str] = set()
  docs: dict[str, list[str]] = collections.defaultdict(list)
  for domain, text in iter_documents(data_dir, split, skips,
                                     domain_field=domain_field,
                                     text_field=text_field, seen_domains=seen):
    docs[domain].append(text)
  check_documents(str(Path(data_dir) / split), {d: len(v) for d, v in docs.items()}, seen,
                  skips, domain_field=domain_field, text_field=text_field)
  return {name: docs[name] for name in sorted(docs)}, skips
