"""A small, deterministic multi-domain text corpus for tests and CPU runs.

Five domains with clearly different statistics and imbalanced shares of the
documents, written in the SlimPajama layout and schema so that the real
reading path is exercised:

=========  =====  ==========================================================
domain     share  content
=========  =====  ==========================================================
prose      50 %   sentences from a small word-level grammar (English-like)
code       25 %   python-like functions: indentation, identifiers, operators
numbers    12 %   correct arithmetic facts, one per line (digits and symbols)
dna         8 %   FASTA-like records over ``ACGT`` from a biased Markov chain
legal       5 %   boilerplate: long clauses, repeated nearly verbatim
=========  =====  ==========================================================

The default size (about 1.9 MB of text) trains a byte-level BPE of a few
thousand tokens and packs in a couple of seconds on a small CPU, and yields
several thousand rows of 65 tokens: a few hundred steps of a tiny model at
batch 16 without many repeats.

Randomness comes from one ``random.Random(seed)`` (Mersenne Twister; its
integer and float draws for a given seed have not changed across Python 3
releases), and files are written with fixed JSON formatting, so the same
arguments give byte-identical files.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

DOMAIN_SHARES = {"prose": 0.50, "code": 0.25, "numbers": 0.12, "dna": 0.08,
                 "legal": 0.05}

_NOUNS = ("river", "village", "teacher", "garden", "machine", "letter",
          "mountain", "child", "window", "market", "story", "captain", "forest",
          "engine", "doctor", "bridge", "winter", "painter", "harbour", "lamp",
          "farmer", "library", "storm", "road", "musician", "kitchen")
_ADJS = ("old", "quiet", "bright", "small", "distant", "heavy", "green",
         "careful", "strange", "warm", "narrow", "golden", "tired", "clever",
         "empty", "famous")
_VERBS = ("watched", "carried", "found", "opened", "followed", "remembered",
          "built", "crossed", "painted", "described", "visited", "repaired",
          "lost", "answered", "measured", "praised")
_PREPS = ("near", "behind", "across", "under", "beside", "beyond", "through",
          "above")
_ADVS = ("slowly", "again", "at dawn", "without a word", "every morning",
         "in the rain", "for a long time", "with great care")
_CONNECTIVES = ("Then", "Later", "Meanwhile", "After that", "Still",
                "Eventually", "That evening", "Years later")

_IDENTS = ("value", "count", "total", "items", "result", "index", "name",
           "data", "buffer", "score", "limit", "offset", "key", "node", "path",
           "width")
_FUNCS = ("compute", "update", "parse", "merge", "load", "scale", "filter",
          "normalize", "collect", "render", "split", "check")

_PARTIES = ("the Licensor", "the Licensee", "the Company", "the Contractor",
            "the Client", "the Supplier")
_CLAUSES = (
    "Subject to the terms and conditions of this Agreement, {a} hereby grants "
    "to {b} a non-exclusive, non-transferable, revocable license to use the "
    "Materials solely for the purposes set forth herein.",
    "Nothing in this Agreement shall be construed as creating a partnership, "
    "joint venture or agency relationship between {a} and {b}, and neither "
    "party shall have authority to bind the other in any respect.",
    "{a} shall indemnify, defend and hold harmless {b} from and against any "
    "and all claims, damages, losses, liabilities, costs and expenses arising "
    "out of or relating to any breach of this Agreement by {a}.",
    "This Agreement shall be governed by and construed in accordance with the "
    "laws of the jurisdiction in which {b} maintains its principal place of "
    "business, without regard to its conflict of laws principles.",
    "IN NO EVENT SHALL {a} BE LIABLE FOR ANY INDIRECT, INCIDENTAL, SPECIAL, "
    "EXEMPLARY OR CONSEQUENTIAL DAMAGES, EVEN IF ADVISED OF THE POSSIBILITY "
    "OF SUCH DAMAGES.",
    "Either party may terminate this Agreement upon {n} days written notice "
    "to the other party if the other party materially breaches this "
    "Agreement and fails to cure such breach within the notice period.",
    "All notices under this Agreement shall be in writing and shall be deemed "
    "given when delivered personally or {n} days after being sent by "
    "registered mail to the address of {b}.",
    "{b} shall keep confidential all Confidential Information disclosed by "
    "{a} and shall not disclose such information to any third party without "
    "the prior written consent of {a}.",
    "The failure of {a} to enforce any provision of this Agreement shall not "
    "constitute a waiver of that provision or of the right of {a} to enforce "
    "it at a later time.",
    "If any provision of this Agreement is held to be invalid or "
    "unenforceable, the remaining provisions shall continue in full force and "
    "effect.",
)

# Order-1 Markov chain over ACGT with a GC-rich bias and sticky repeats, so
# the domain has structure beyond uniform letters.
_DNA = "ACGT"
_DNA_NEXT = {
    "A": (0.35, 0.20, 0.25, 0.20),
    "C": (0.15, 0.30, 0.40, 0.15),
    "G": (0.20, 0.35, 0.30, 0.15),
    "T": (0.25, 0.20, 0.20, 0.35),
}
_DNA_MOTIFS = ("TATAAA", "GAATTC", "CCGCGG", "AGGAGG")


def _sentence(rng: random.Random) -> str:
  c = rng.choice
  form = rng.randrange(4)
  if form == 0:
    s = f"the {c(_ADJS)} {c(_NOUNS)} {c(_VERBS)} the {c(_NOUNS)} {c(_ADVS)}"
  elif form == 1:
    s = (f"the {c(_NOUNS)} {c(_PREPS)} the {c(_ADJS)} {c(_NOUNS)} "
         f"{c(_VERBS)} a {c(_ADJS)} {c(_NOUNS)}")
  elif form == 2:
    s = (f"{c(_CONNECTIVES).lower()} the {c(_NOUNS)} {c(_VERBS)} the "
         f"{c(_NOUNS)} and the {c(_NOUNS)} {c(_VERBS)} it {c(_ADVS)}")
  else:
    s = (f"no one {c(_VERBS)} the {c(_ADJS)} {c(_NOUNS)} {c(_PREPS)} the "
         f"{c(_NOUNS)}, so the {c(_NOUNS)} {c(_VERBS)} it")
  return s[0].upper() + s[1:] + rng.choice((".", ".", ".", "!", "?"))


def _prose(rng: random.Random) -> str:
  paragraphs = []
  for _ in range(rng.randint(1, 3)):
    n = rng.randint(3, 6)
    paragraphs.append(" ".join(_sentence(rng) for _ in range(n)))
  return "\n\n".join(paragraphs)


def _code(rng: random.Random) -> str:
  c = rng.choice
  parts = []
  for _ in range(rng.randint(1, 3)):
    fn = c(_FUNCS)
    a, b, acc = rng.sample(_IDENTS, 3)  # distinct, so that the code parses
    n = rng.randint(2, 64)
    op = c(("+", "-", "*", "//", "%"))
    lines = [f"def {fn}_{a}({a}, {b}={n}):",
             f'    """{fn.capitalize()} the {a} by {b}."""',
             f"    {acc} = {rng.randint(0, 9)}",
             f"    for i in range(len({a})):"]
    if rng.random() < 0.5:
      lines += [f"        if {a}[i] > {b}:",
                f"            {acc} = {acc} {op} {a}[i]",
                "        else:",
                f"            {acc} += {rng.randint(1, 9)}"]
    else:
      lines += [f"        {acc} = ({acc} {op} {a}[i]) % {n}"]
    lines.append(f"    return {acc}")
    parts.append("\n".join(lines))
  return "\n\n\n".join(parts) + "\n"


def _numbers(rng: random.Random) -> str:
  lines = []
  for _ in range(rng.randint(20, 45)):
    a, b = rng.randint(0, 999), rng.randint(1, 999)
    op = rng.randrange(3)
    if op == 0:
      lines.append(f"{a} + {b} = {a + b}")
    elif op == 1:
      lines.append(f"{a} - {b} = {a - b}")
    else:
      a, b = a % 100, b % 100
      lines.append(f"{a} * {b} = {a * b}")
  return "\n".join(lines)


def _dna(rng: random.Random) -> str:
  n = rng.randint(300, 700)
  base = rng.choice(_DNA)
  seq = []
  while len(seq) < n:
    if rng.random() < 0.02:
      seq.extend(rng.choice(_DNA_MOTIFS))
      base = seq[-1]
      continue
    u, acc = rng.random(), 0.0
    for letter, p in zip(_DNA, _DNA_NEXT[base]):
      acc += p
      if u < acc:
        break
    base = letter
    seq.append(base)
  s = "".join(seq[:n])
  lines = [s[i:i + 60] for i in range(0, n, 60)]
  return f">seq{rng.randrange(10**6):06d} len={n}\n" + "\n".join(lines)


def _legal(rng: random.Random) -> str:
  a, b = rng.sample(_PARTIES, 2)
  k = rng.randint(4, 7)
  clauses = rng.sample(range(len(_CLAUSES)), k)
  out = [f"AGREEMENT No. {rng.randint(100, 9999)}"]
  for i, j in enumerate(clauses, start=1):
    text = _CLAUSES[j].format(a=a, b=b, n=rng.choice((10, 15, 30, 60, 90)))
    out.append(f"Section {i}. {text}")
  return "\n\n".join(out)


_GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "prose": _prose, "code": _code, "numbers": _numbers, "dna": _dna,
    "legal": _legal}


def _record(text: str, domain: str, schema: str) -> dict:
  if schema == "slimpajama":
    return {"text": text, "meta": {"redpajama_set_name": domain}}
  return {"text": text, "domain": domain}


def _write_jsonl(path: Path, records: list[dict]) -> None:
  # Fixed formatting (ASCII escapes, default separators, insertion order) and
  # an atomic replace, so a reader never sees a half-written file.
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w", encoding="utf-8", newline="\n") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=True))
      f.write("\n")
  os.replace(tmp, path)


def _split_counts(n: int, shares: dict[str, float]) -> dict[str, int]:
  """``n`` split by ``shares`` (largest remainders), at least 1 each."""
  raw = {d: n * s for d, s in shares.items()}
  counts = {d: max(1, int(v)) for d, v in raw.items()}
  rest = n - sum(counts.values())
  for d in sorted(shares, key=lambda d: raw[d] - int(raw[d]), reverse=True):
    if rest <= 0:
      break
    counts[d] += 1
    rest -= 1
  return counts


def write_synthetic_corpus(out_dir: str | os.PathLike, *, seed: int = 0,
                           total_docs: int = 3000, val_fraction: float = 0.1,
                           schema: str = "slimpajama",
                           num_train_files: int = 4) -> Path:
  """Writes the synthetic corpus; returns ``out_dir`` as a Path.

  Layout: ``out_dir/train/chunk_XXXX.jsonl`` (``num_train_files`` files) and
  ``out_dir/validation/chunk_0000.jsonl``; every file interleaves the domains
  in a seeded random order, as SlimPajama's chunks do, so grouping by domain
  is the reader's job. Files of the same names are replaced.

  Args:
    out_dir: corpus root (created if needed).
    seed: the same seed gives byte-identical files.
    total_docs: documents over both splits, divided among the domains by
      :data:`DOMAIN_SHARES` (each domain gets at least 2 per split).
    val_fraction: share of each domain's documents in ``validation``.
    schema: ``"slimpajama"`` (``meta.redpajama_set_name``) or ``"plain"``
      (``domain``).
    num_train_files: number of train chunk files.

  Returns:
    ``Path(out_dir)``.
  """
  if schema not in ("slimpajama", "plain"):
    raise ValueError(f"schema must be 'slimpajama' or 'plain', got {schema!r}")
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
  if num_train_files < 1:
    raise ValueError(f"num_train_files must be positive, got {num_train_files}")
  rng = random.Random(seed)
  splits: dict[str, list[dict]] = {"train": [], "validation": []}
  for domain, n in _split_counts(total_docs, DOMAIN_SHARES).items():
    gen = _GENERATORS[domain]
    n_val = max(2, round(n * val_fraction))
    n_train = max(2, n - n_val)
    for split, count in (("validation", n_val), ("train", n_train)):
      splits[split].extend(_record(gen(rng), domain, schema)
                           for _ in range(count))

  out_dir = Path(out_dir)
  for split, records in splits.items():
    rng.shuffle(records)
    folder = out_dir / split
    folder.mkdir(parents=True, exist_ok=True)
    n_files = num_train_files if split == "train" else 1
    per_file = -(-len(records) // n_files)
    for i in range(n_files):
      _write_jsonl(folder / f"chunk_{i:04d}.jsonl",
                   records[i * per_file:(i + 1) * per_file])
  return out_dir
