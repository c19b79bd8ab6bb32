"""Corpora whose training labels are coarse and misleading.

DoGraph's thesis is that model-centric domains serve best where the human
labels are poor. :func:`write_coarse_corpus` makes such labels on purpose: it
copies a corpus and, in the ``train`` split only, gives every document of a
*hidden* source the label of a *host* source (``merge={"licenses":
"python"}``), optionally subsampling a source's training documents
(``keep_fraction``) to make the hidden one rare. The ``validation`` split is
copied with its true labels, so a run with ``--eval_domains validation``
reports the loss of every true source, the hidden one included, while a
label-based mixing method only ever sees the host's label.

Every record of both splits also gets a top-level ``"true_domain"`` field
(:data:`TRUE_DOMAIN_FIELD`) holding its source's label. The readers ignore it
by default; ``--domain_field true_domain`` reads the very same documents with
the true labels, which is the reference "stratified over the true labels"
(same training documents, same subsample, same validation split, same cached
tokenizer).

Layout: the source's files are mirrored (same relative paths under
``train/`` and ``validation/``; ``.jsonl.gz``, ``.json.gz`` and ``.parquet``
files become ``.jsonl``), record by record in file order, with only the label
changed and ``true_domain`` added. Records the trainer would skip (no text,
no label, ...; :data:`~dograph_jax.data.corpus.SKIP_REASONS`) are dropped and
counted. Parquet rows keep only their text and label columns. A
``manifest.json`` at the root records the mapping and the per-source counts.
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dograph_jax.data.corpus import (AUTO_DOMAIN_FIELDS, FILE_SUFFIXES,
                                     SkipCounts, iter_file_records,
                                     list_split_files)

TRUE_DOMAIN_FIELD = "true_domain"
SPLITS = ("train", "validation")


def _parse(field: str) -> tuple[str, ...]:
  parts = tuple(field.split("."))
  if not field or not all(parts):
    raise ValueError(f"invalid field path {field!r}")
  return parts


def _walk(record: Any, parts: tuple[str, ...], *, decode: bool) -> tuple[dict | None, Any]:
  """``(the object holding the last key, the value)`` of ``record[p0][p1]...``;
  ``(None, None)`` where a level is missing or not an object.

  A nested level stored as a JSON string (parquet exports keep ``meta`` as a
  string column) is decoded; with ``decode`` it is also put back decoded, so
  that the caller can change a value inside it.
  """
  holder, value = None, record
  for i, key in enumerate(parts):
    if isinstance(value, str) and value.startswith("{"):
      try:
        value = json.loads(value)
      except ValueError:
        return None, None
      if decode and holder is not None:
        holder[parts[i - 1]] = value
    if not isinstance(value, dict):
      return None, None
    holder, value = value, value.get(key)
  return holder, value


def _usable(record: Any, domain_paths, text_parts, skips: SkipCounts,
            ) -> tuple[str, tuple[str, ...]] | None:
  """``(domain, the path it was found at)`` of a record the trainer would read
  (the checks of :func:`~dograph_jax.data.corpus.iter_documents`, in its
  order), else ``None`` with the reason counted in ``skips``."""
  if not isinstance(record, dict):
    skips.add("not_an_object")
    return None
  domain, found = None, None
  for parts in domain_paths:
    domain = _walk(record, parts, decode=False)[1]
    if domain is not None:
      found = parts
      break
  if domain is None:
    skips.add("missing_domain")
    return None
  if not isinstance(domain, str) or not domain.strip():
    skips.add("bad_domain")
    return None
  text = _walk(record, text_parts, decode=False)[1]
  reason = ("missing_text" if text is None else "non_string_text" if not isinstance(text, str)
            else "empty_text" if not text.strip() else None)
  if reason is None:
    try:
      text.encode("utf-8")
    except UnicodeEncodeError:
      reason = "invalid_utf8"
  if reason:
    skips.add(reason)
    return None
  return domain, found


def _records(src: Path, split: str, domain_paths, text_parts, skips: SkipCounts,
             ) -> Iterator[tuple[Path, Iterator[tuple[dict, str, tuple[str, ...]]]]]:
  """Per data file of the split: ``(its path relative to the split folder, its
  usable records as (record, domain, label path))``, streamed."""
  columns = {text_parts[0]} | {p[0] for p in domain_paths}
  split_dir = src / split
  for path in list_split_files(src, split):
    def usable(path=path):
      for record in iter_file_records(path, skips, columns=columns):
        got = _usable(record, domain_paths, text_parts, skips)
        if got is not None:
          yield record, *got
    yield path.relative_to(split_dir), usable()


def _out_name(relative: Path) -> Path:
  for suffix in FILE_SUFFIXES:
    if relative.name.endswith(suffix):
      return relative.with_name(relative.name[:-len(suffix)] + ".jsonl")
  raise AssertionError(relative)  # list_split_files only lists these suffixes


def _check_mapping(merge: Mapping[str, str], keep: Mapping[str, float],
                   domains: set[str]) -> None:
  if not merge:
    raise ValueError("merge is empty: name at least one hidden=host pair")
  known = sorted(domains)
  for hidden, host in merge.items():
    for name in (hidden, host):
      if name not in domains:
        raise ValueError(f"merge {hidden}->{host}: unknown source {name!r}; the train split's "
                         f"sources are {known}")
    if hidden == host:
      raise ValueError(f"merge {hidden}->{host}: a source cannot be merged into itself")
    if host in merge:
      raise ValueError(f"merge {hidden}->{host}->{merge[host]}: a chain; {host!r} is itself "
                       f"hidden, so merge {hidden!r} into the final label directly")
  for name, fraction in keep.items():
    if name not in domains:
      raise ValueError(f"keep_fraction: unknown source {name!r}; the train split's sources "
                       f"are {known}")
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
      raise ValueError(f"keep_fraction[{name!r}] must be in (0, 1], got {fraction!r}")


def kept_indices(count: int, fraction: float, source: str, seed: int) -> set[int] | None:
  """The positions (in file order) of the ``count`` training documents of
  ``source`` that a ``fraction`` subsample keeps; ``None`` = all.

  Exactly ``max(1, round(fraction * count))`` of them, drawn without
  replacement by ``random.Random(f"{seed}/{source}")`` (a string seed is
  hashed with SHA-512, stable across runs and Python versions), so the
  subsample depends only on the seed, the source and its documents: not on
  ``merge`` or on the other sources.
  """
  if fraction >= 1.0:
    return None
  k = min(count, max(1, round(fraction * count)))
  return set(random.Random(f"{seed}/{source}").sample(range(count), k))


def write_coarse_corpus(src_dir: str | os.PathLike, dst_dir: str | os.PathLike,
                        merge: Mapping[str, str], *,
                        keep_fraction: Mapping[str, float] | None = None, seed: int = 0,
                        domain_field: str = "auto", text_field: str = "text",
                        overwrite: bool = False) -> dict:
  """Copies the corpus ``src_dir`` to ``dst_dir`` with coarse training labels.

  Args:
    src_dir: a corpus (``train/`` and ``validation/``; any layout and schema
      :mod:`~dograph_jax.data.corpus` reads).
    dst_dir: where the coarse corpus goes (written under a temporary name
      beside it, then renamed: a reader never sees half of it).
    merge: ``{hidden source: host source}``: in ``train``, the hidden
      source's documents take the host's label. Hosts must not be hidden
      themselves (no chains).
    keep_fraction: ``{source: fraction in (0, 1]}``: keep only this share of
      the source's training documents (exactly ``max(1, round(f * n))`` of
      its ``n``; :func:`kept_indices`), e.g. to make a hidden source rare.
      Validation is never subsampled.
    seed: fixes the subsample.
    domain_field, text_field: where the label and the text are, as for
      :func:`~dograph_jax.data.corpus.read_split` (the label is rewritten
      where it was found).
    overwrite: replace an existing ``dst_dir``; without it that is an error.

  Returns:
    The manifest (also written to ``dst_dir/manifest.json``): ``merge``,
    ``keep_fraction``, ``seed``; per true source, ``train`` (``label``,
    ``docs_in``, ``docs``, ``bytes``: the training documents read, kept and
    their UTF-8 bytes of text) and ``validation`` (``docs``, ``bytes``);
    ``train_labels`` (per training label: ``docs``, ``bytes`` and the
    ``sources`` it holds with their docs); ``hidden`` (per hidden source: its
    ``share_of_label`` and ``share_of_train`` in bytes); ``train_byte_shares``
    (each true source's share of the training text) and ``skipped`` (per
    split, what the reader would skip, by reason).

  Raises:
    FileExistsError: ``dst_dir`` exists and ``overwrite`` is off.
    ValueError: an empty ``merge``, an unknown source, a source merged into
      itself, a chain, a ``keep_fraction`` outside (0, 1], or ``dst_dir`` the
      same folder as ``src_dir``.
  """
  src, dst = Path(src_dir), Path(dst_dir)
  keep = dict(keep_fraction or {})
  if dst.resolve() == src.resolve():
    raise ValueError(f"dst_dir {str(dst)!r} is the source corpus itself")
  if dst.exists() and not overwrite:
    raise FileExistsError(f"{str(dst)!r} exists; pass overwrite=True (--overwrite) to replace it")
  domain_paths = ([_parse(f) for f in AUTO_DOMAIN_FIELDS] if domain_field == "auto"
                  else [_parse(domain_field)])
  text_parts = _parse(text_field)

  # Pass 1: how many usable training documents each source has (the
  # subsample draws positions among them), and which sources exist.
  counts: collections.Counter = collections.Counter()
  for _, records in _records(src, "train", domain_paths, text_parts, SkipCounts()):
    for _, domain, _ in records:
      counts[domain] += 1
  _check_mapping(merge, keep, set(counts))
  kept = {name: kept_indices(counts[name], f, name, seed) for name, f in keep.items()}

  # Pass 2: write, record by record, under a temporary name.
  tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  stats = {split: collections.defaultdict(collections.Counter) for split in SPLITS}
  skipped = {}
  try:
    for split in SPLITS:
      skips, seen, written = SkipCounts(), collections.Counter(), set()
      for relative, records in _records(src, split, domain_paths, text_parts, skips):
        out = tmp / split / _out_name(relative)
        if out in written:
          raise ValueError(f"{src / split / relative} and another file both become {out.name}")
        written.add(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8", newline="\n") as f:
          for record, domain, label_path in records:
            s = stats[split][domain]
            s["docs_in"] += 1
            position, seen[domain] = seen[domain], seen[domain] + 1
            if split == "train":
              chosen = kept.get(domain)
              if chosen is not None and position not in chosen:
                continue
              holder, _ = _walk(record, label_path, decode=True)
              holder[label_path[-1]] = merge.get(domain, domain)
            record[TRUE_DOMAIN_FIELD] = domain
            f.write(json.dumps(record))
            f.write("\n")
            s["docs"] += 1
            s["bytes"] += len(_walk(record, text_parts, decode=False)[1].encode("utf-8"))
      skipped[split] = skips.as_dict()
    manifest = _manifest(src, merge, keep, seed, domain_field, stats, skipped)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if dst.exists():  # overwrite: move the old one aside, then swap
      old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
      dst.rename(old)
      tmp.rename(dst)
      shutil.rmtree(old)
    else:
      dst.parent.mkdir(parents=True, exist_ok=True)
      tmp.rename(dst)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return manifest


def _manifest(src: Path, merge, keep, seed, domain_field, stats, skipped) -> dict:
  train, val = stats["train"], stats["validation"]
  labels: dict[str, dict] = {}
  for name in sorted(train):
    label = merge.get(name, name)
    entry = labels.setdefault(label, {"docs": 0, "bytes": 0, "sources": {}})
    entry["docs"] += train[name]["docs"]
    entry["bytes"] += train[name]["bytes"]
    entry["sources"][name] = train[name]["docs"]
  total = sum(s["bytes"] for s in train.values()) or 1
  return {
      "source_corpus": str(src), "merge": dict(merge), "keep_fraction": dict(keep),
      "seed": seed, "domain_field": domain_field, "true_domain_field": TRUE_DOMAIN_FIELD,
      "train": {n: {"label": merge.get(n, n), "docs_in": train[n]["docs_in"],
                    "docs": train[n]["docs"], "bytes": train[n]["bytes"]}
                for n in sorted(train)},
      "validation": {n: {"docs": val[n]["docs"], "bytes": val[n]["bytes"]} for n in sorted(val)},
      "train_labels": labels,
      "hidden": {h: {"label": host,
                     "share_of_label": train[h]["bytes"] / max(labels[host]["bytes"], 1),
                     "share_of_train": train[h]["bytes"] / total}
                 for h, host in merge.items()},
      "train_byte_shares": {n: train[n]["bytes"] / total for n in sorted(train)},
      "skipped": skipped,
  }
