"""Builds a real multi-domain corpus from documents found on this machine.

A Debian system with CPython carries several kinds of text with clearly
different statistics, enough for a small data-mixing experiment without any
download:

===========  ===============================================================
domain       source
===========  ===============================================================
python       the CPython standard library (``sysconfig`` ``stdlib``, without
             ``site-packages``), ``*.py``
c_headers    ``/usr/include``, ``*.h``
man_pages    ``/usr/share/man/man*/*`` (English pages; gzip'd troff, reduced
             to text by dropping requests and escapes)
licenses     ``/usr/share/common-licenses/*`` and ``/usr/share/doc/*/copyright``
changelogs   ``/usr/share/doc/*/changelog*.gz``
===========  ===============================================================

Each file is one document (cut at a line boundary after ``--max_doc_chars``
characters). Files are listed, sorted, shuffled with a seed derived from
``--seed`` and the domain name, and read in that order until the domain's
share of ``--budget_mb`` (UTF-8 bytes of text, both splits together) is
filled; the first ``--val_fraction`` of each domain's documents go to
``validation``. Unreadable or non-UTF-8 files, exact duplicates (many
``copyright`` files repeat the same licence) and near-empty documents are
skipped and counted. A domain without sources on this machine is skipped with
a warning and the others' shares are renormalised.

Output, in the SlimPajama schema (``{"text", "meta": {"redpajama_set_name",
"source"}}``)::

  <out>/train/<domain>.jsonl  <out>/validation/<domain>.jsonl  <out>/manifest.json

Run::

  python experiments/data/build_local_corpus.py --out data/local --budget_mb 20 \
      --shares python=0.35,c_headers=0.2,man_pages=0.2,licenses=0.1,changelogs=0.15
"""

from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import json
import logging
import os
import random
import re
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_SHARES = {"python": 0.35, "c_headers": 0.20, "man_pages": 0.20,
                  "licenses": 0.10, "changelogs": 0.15}
# Documents shorter than this (after cleaning) carry almost no text: stub
# headers, man pages that only redirect to another page.
MIN_DOC_CHARS = 64


# --------------------------------------------------------------------------
# Where each domain's files are.


def _walk_files(root: str | os.PathLike, accept: Callable[[str], bool],
                skip_dirs: frozenset[str] = frozenset()) -> Iterator[str]:
  """Paths of the regular files below ``root`` whose name passes ``accept``.

  Plain strings, not Paths: a listing holds tens of thousands of them.

  Symbolic links are not followed: on Debian they are aliases (man pages
  linked under a second name, ``GPL -> GPL-3``) whose text is already there.
  """
  try:
    entries = list(os.scandir(root))
  except OSError:
    return
  for entry in sorted(entries, key=lambda e: e.name):
    if entry.is_symlink():
      continue
    if entry.is_dir(follow_symlinks=False):
      if entry.name not in skip_dirs:
        yield from _walk_files(entry.path, accept, skip_dirs)
    elif entry.is_file(follow_symlinks=False) and accept(entry.name):
      yield entry.path


def _python_files() -> Iterator[str]:
  stdlib = sysconfig.get_paths()["stdlib"]
  if os.path.isdir(stdlib):
    yield from _walk_files(
        stdlib, lambda n: n.endswith(".py"),
        frozenset({"site-packages", "dist-packages", "__pycache__"}))


def _c_header_files() -> Iterator[str]:
  if os.path.isdir("/usr/include"):
    yield from _walk_files("/usr/include", lambda n: n.endswith(".h"))


def _man_files() -> Iterator[str]:
  root = Path("/usr/share/man")
  if root.is_dir():
    # Only man1..man9 directly under the root: the English pages (translations
    # live in <lang>/manN).
    for section in sorted(root.glob("man[1-9]*")):
      if section.is_dir():
        yield from _walk_files(section, lambda n: not n.startswith("."))


def _license_files() -> Iterator[str]:
  yield from _walk_files("/usr/share/common-licenses", lambda n: True)
  yield from map(str, Path("/usr/share/doc").glob("*/copyright"))


def _changelog_files() -> Iterator[str]:
  yield from map(str, Path("/usr/share/doc").glob("*/changelog*.gz"))


SOURCES: dict[str, Callable[[], Iterator[str]]] = {
    "python": _python_files, "c_headers": _c_header_files,
    "man_pages": _man_files, "licenses": _license_files,
    "changelogs": _changelog_files}


# --------------------------------------------------------------------------
# Turning a file into a document.

# Named troff glyphs worth keeping as text; any other glyph is dropped.
_GLYPHS = {"em": "--", "en": "-", "hy": "-", "mi": "-", "aq": "'", "dq": '"',
           "lq": '"', "rq": '"', "oq": "'", "cq": "'", "bu": "*", "co": "(c)",
           "rg": "(R)", "ga": "`", "ti": "~", "ha": "^", "rs": "\\", "pl": "+",
           "mu": "x", "<=": "<=", ">=": ">=", "->": "->", "<-": "<-"}
_SINGLE = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ",
           ".": ".", "'": "'", "`": "`"}
# One escape: glyph \(xx or \[name], string \*x, font \fX, size \sN,
# register \nX, comment \" (to the end of the line), or any one character.
_ESCAPE = re.compile(
    r'\\(\(..|\[[^\]]*\]|\*(?:\(..|\[[^\]]*\]|.)|f(?:\(..|\[[^\]]*\]|.)'
    r'|s[+-]?\d+|n(?:\(..|\[[^\]]*\]|.)|".*|.)')
_ARG = re.compile(r'"([^"]*)"|(\S+)')
_SECTION_REQUESTS = {"SH", "SS"}
_FONT_REQUESTS = {"B", "I", "SM", "SB"}  # arguments joined with spaces
_ALT_FONT_REQUESTS = {"BI", "BR", "IB", "IR", "RB", "RI"}  # joined tightly
_BREAK_REQUESTS = {"PP", "LP", "P", "TP", "IP", "HP", "br", "sp"}


def _unescape(s: str) -> str:
  def sub(m: re.Match) -> str:
    e = m.group(1)
    if e[0] == "(":
      return _GLYPHS.get(e[1:], "")
    if e[0] == "[":
      return _GLYPHS.get(e[1:-1], "")
    if len(e) == 1:
      # \& \| \^ \% \c \: and the like only steer typesetting.
      return _SINGLE.get(e, "")
    return ""
  return _ESCAPE.sub(sub, s)


def troff_to_text(source: str) -> str:
  """Plain text of a man page: requests dropped, escapes resolved.

  A deliberately simple reduction, enough for language-model text: headings
  (``.SH``), font requests (``.B``, ``.BR``, ...) and ``.IP`` tags keep their
  arguments; other requests and comments vanish; paragraph requests become
  blank lines.
  """
  out: list[str] = []
  for line in source.splitlines():
    if line.startswith((".", "'")):
      body = line[1:].strip()
      if body.startswith('\\"'):
        continue
      name, _, rest = body.partition(" ")
      args = [a or b for a, b in _ARG.findall(rest)]
      if name in _SECTION_REQUESTS:
        out += ["", _unescape(" ".join(args))]
      elif name in _FONT_REQUESTS:
        out.append(_unescape(" ".join(args)))
      elif name in _ALT_FONT_REQUESTS:
        out.append(_unescape("".join(args)))
      elif name in _BREAK_REQUESTS:
        out.append("")
        if name == "IP" and args:
          out.append(_unescape(args[0]))
      continue
    out.append(_unescape(line))
  text = "\n".join(out)
  return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    data = f.read()
  if path.endswith(".gz"):
    data = gzip.decompress(data)
  return data


def _cut(text: str, max_chars: int) -> str:
  """``text`` cut after at most ``max_chars`` characters, at a line end."""
  if len(text) <= max_chars:
    return text
  head = text[:max_chars]
  nl = head.rfind("\n")
  return head[:nl + 1] if nl > max_chars // 2 else head


# --------------------------------------------------------------------------
# The build.


def parse_shares(spec: str) -> dict[str, float]:
  """``"python=0.4,c_headers=0.2"`` -> ``{"python": 0.4, "c_headers": 0.2}``."""
  shares = {}
  for item in spec.split(","):
    if not item.strip():
      continue
    name, sep, value = item.partition("=")
    name = name.strip()
    if not sep or name not in SOURCES:
      raise ValueError(f"bad share {item!r}: expected <domain>=<weight> with "
                       f"domain in {sorted(SOURCES)}")
    shares[name] = float(value)
    if shares[name] < 0:
      raise ValueError(f"negative share for {name!r}")
  if not shares or sum(shares.values()) <= 0:
    raise ValueError(f"no positive share in {spec!r}")
  return shares


def _collect_domain(name: str, budget_bytes: float, *, seed: int,
                    max_doc_chars: int, skipped: collections.Counter,
                    ) -> list[tuple[str, str]]:
  """``(source path, text)`` documents of one domain, in the seeded order."""
  # Aliases that survive the walk (/usr/share/doc/<pkg> is often a link to a
  # sibling package's folder) are caught below as duplicate texts.
  candidates = sorted(SOURCES[name]())
  # A string seed is hashed (sha512) by random.Random: stable across runs.
  random.Random(f"{seed}/{name}").shuffle(candidates)

  docs, seen_text, used = [], set(), 0
  for path in candidates:
    # At least two documents, so both splits get one.
    if used >= budget_bytes and len(docs) >= 2:
      break
    try:
      raw = _read_bytes(path)
    except (OSError, EOFError, ValueError) as e:  # gzip errors included
      logger.debug("skip %s: %s", path, e)
      skipped["unreadable"] += 1
      continue
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError:
      skipped["not_utf8"] += 1
      continue
    if name == "man_pages":
      text = troff_to_text(text)
    text = _cut(text.replace("\r\n", "\n"), max_doc_chars)
    if len(text.strip()) < MIN_DOC_CHARS:
      skipped["too_short"] += 1
      continue
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    if digest in seen_text:
      skipped["duplicate"] += 1
      continue
    seen_text.add(digest)
    docs.append((path, text))
    used += len(text.encode("utf-8"))
  return docs


def _write_jsonl(path: Path, name: str, docs: list[tuple[str, str]]) -> None:
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w", encoding="utf-8", newline="\n") as f:
    for source, text in docs:
      f.write(json.dumps({"text": text, "meta": {"redpajama_set_name": name,
                                                 "source": source}}))
      f.write("\n")
  os.replace(tmp, path)


def build_corpus(out: str | os.PathLike, *, budget_mb: float = 20.0,
                 shares: dict[str, float] | None = None,
                 val_fraction: float = 0.05, seed: int = 0,
                 max_doc_chars: int = 20_000, overwrite: bool = False,
                 ) -> dict[str, dict]:
  """Builds the corpus into ``out``; returns the per-domain summary.

  Args:
    out: corpus root; ``train/`` and ``validation/`` are written below it.
    budget_mb: total text (MB of UTF-8, both splits) over all domains.
    shares: domain -> weight (normalised over the domains found here);
      default :data:`DEFAULT_SHARES`. A zero weight leaves a domain out.
    val_fraction: share of each domain's documents put in ``validation``
      (at least one).
    seed: fixes the file order, hence the selection.
    max_doc_chars: longer files are cut at a line end after this many
      characters.
    overwrite: replace the ``*.jsonl`` files of an earlier build in
      ``out/train`` and ``out/validation``; without it such files are an error.

  Returns:
    ``{domain: {"train_docs", "val_docs", "train_mb", "val_mb", "skipped"}}``
    for the domains built.

  Raises:
    FileExistsError: ``out`` holds an earlier build and ``overwrite`` is off.
    ValueError: bad arguments, or no domain has sources on this machine.
  """
  shares = dict(DEFAULT_SHARES if shares is None else shares)
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
  if budget_mb <= 0 or max_doc_chars < MIN_DOC_CHARS:
    raise ValueError("budget_mb must be positive and max_doc_chars at least "
                     f"{MIN_DOC_CHARS}")
  out = Path(out)
  split_dirs = {s: out / s for s in ("train", "validation")}
  old = [p for d in split_dirs.values() if d.is_dir() for p in d.glob("*.jsonl")]
  if old and not overwrite:
    raise FileExistsError(f"{str(out)!r} already holds a corpus ({len(old)} "
                          "jsonl files); pass --overwrite to replace it")

  # Which domains have any source here (cheap: stop at the first file).
  available = {}
  for name, share in shares.items():
    if share <= 0:
      continue
    if next(iter(SOURCES[name]()), None) is None:
      logger.warning("domain %s: no source files on this machine; skipped", name)
      continue
    available[name] = share
  if not available:
    raise ValueError("no domain has source files on this machine")
  total_share = sum(available.values())

  collected = {}
  for name, share in sorted(available.items()):
    skipped: collections.Counter = collections.Counter()
    docs = _collect_domain(name, budget_mb * 1e6 * share / total_share,
                           seed=seed, max_doc_chars=max_doc_chars,
                           skipped=skipped)
    if len(docs) < 2:
      logger.warning("domain %s: fewer than 2 usable documents; skipped", name)
      continue
    collected[name] = (docs, skipped)
  if not collected:
    raise ValueError("no domain yielded usable documents")

  for p in old:
    p.unlink()
  for d in split_dirs.values():
    d.mkdir(parents=True, exist_ok=True)
  summary = {}
  for name, (docs, skipped) in collected.items():
    n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    parts = {"validation": docs[:n_val], "train": docs[n_val:]}
    for split, part in parts.items():
      _write_jsonl(split_dirs[split] / f"{name}.jsonl", name, part)
    mb = {s: sum(len(t.encode("utf-8")) for _, t in p) / 1e6
          for s, p in parts.items()}
    summary[name] = {"train_docs": len(parts["train"]),
                     "val_docs": len(parts["validation"]),
                     "train_mb": round(mb["train"], 4),
                     "val_mb": round(mb["validation"], 4),
                     "skipped": dict(sorted(skipped.items()))}
  manifest = {"budget_mb": budget_mb, "shares": shares, "val_fraction":
              val_fraction, "seed": seed, "max_doc_chars": max_doc_chars,
              "domains": summary}
  (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
  return summary


def _print_summary(summary: dict[str, dict]) -> None:
  print(f"{'domain':<12}{'train docs':>11}{'train MB':>10}{'val docs':>10}"
        f"{'val MB':>9}  skipped")
  for name, s in summary.items():
    skipped = ", ".join(f"{k}={v}" for k, v in s["skipped"].items()) or "-"
    print(f"{name:<12}{s['train_docs']:>11}{s['train_mb']:>10.3f}"
          f"{s['val_docs']:>10}{s['val_mb']:>9.3f}  {skipped}")
  total = sum(s["train_mb"] + s["val_mb"] for s in summary.values())
  print(f"total {total:.3f} MB")


def main(argv: list[str] | None = None) -> dict[str, dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--budget_mb", type=float, default=20.0)
  parser.add_argument("--shares", default=",".join(
      f"{k}={v}" for k, v in DEFAULT_SHARES.items()))
  parser.add_argument("--val_fraction", type=float, default=0.05)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max_doc_chars", type=int, default=20_000)
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  logging.basicConfig(format="%(levelname)s %(message)s")
  summary = build_corpus(
      args.out, budget_mb=args.budget_mb, shares=parse_shares(args.shares),
      val_fraction=args.val_fraction, seed=args.seed,
      max_doc_chars=args.max_doc_chars, overwrite=args.overwrite)
  _print_summary(summary)
  return summary


if __name__ == "__main__":
  main()
