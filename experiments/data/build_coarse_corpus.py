"""Builds a corpus whose training labels hide a rare source inside a big one.

A copy of ``--src`` in which, in ``train`` only, each ``--merge hidden=host``
source's documents carry the host's label, and ``--keep source=fraction``
keeps that share of a source's training documents (exactly, drawn with
``--seed``); ``validation`` is copied whole with the true labels. Every record
also carries its true label in ``"true_domain"``. Writes
``<out>/manifest.json`` with the mapping and the per-source counts
(``dograph_jax.data.coarse.write_coarse_corpus`` documents it).

The two corpora of the coarse-label study (``data/`` is git-ignored):

1. ``licenses`` hidden inside ``python``, from the real-text corpus::

     python experiments/data/build_local_corpus.py --out data/local --budget_mb 8 --seed 0
     python experiments/data/build_coarse_corpus.py --src data/local \\
         --out data/local_licenses_in_python --merge licenses=python --keep licenses=0.3 --seed 0

   ``licenses`` is the smallest source (English legal prose: licence texts
   and ``copyright`` files) and ``python`` the largest (code). Python's
   standard library carries almost no licence boilerplate (0 of its 275
   training documents have a GPL/MIT/BSD/Apache notice), while a third of the
   C headers open with one (64 of 195): hidden in ``c_headers`` the source
   would be half camouflaged by its host; hidden in ``python`` it is
   statistically distinct from every document that shares its label. Keeping
   30 % (30 of 100 documents) makes it rare: 6.6 % of the ``python`` label's
   training text and 2.6 % of all of it (5 validation documents).

2. ``dna`` hidden inside ``prose``, from the bundled synthetic corpus (the one
   ``python experiments/pretrain.py`` generates in ``data/synthetic``)::

     python -c "from dograph_jax.data import write_synthetic_corpus as w; w('data/synthetic', seed=0)"
     python experiments/data/build_coarse_corpus.py --src data/synthetic \\
         --out data/synthetic_dna_in_prose --merge dna=prose --keep dna=0.5 --seed 0

   ``prose`` is the biggest domain (50 % of the documents), ``dna`` a small
   one (8 %) with the most different statistics: a four-letter Markov chain
   next to English sentences. ``legal`` (5 %) would hide in ``prose`` too
   well to be a fair test (English-like clauses); ``dna`` is the
   label-versus-content mismatch a model sees at once and a human label hides.
   Keeping 50 % (108 of 216 documents) leaves it 6.5 % of the ``prose``
   label's training text and 3.9 % of all of it (24 validation documents).

Runs on these corpora take ``--eval_domains validation``, so the reported
domains are the true sources (the hidden one included) while label-based
methods only see the coarse training labels. The reference "stratified over
the true labels" is a stratified run on the same corpus reading the true
labels, ``--method stratified --domain_field true_domain --eval_domains
validation``: the same training documents (the same subsample), the same
validation split and the same tokenizer (cached in ``<out>``); a stratified
run on ``--src`` itself has the same validation split but, with ``--keep``,
more of the hidden source's training documents, and its own tokenizer.
"""

from __future__ import annotations

import argparse
import json

from dograph_jax.data import write_coarse_corpus


def parse_pairs(spec: str, kind: type, what: str) -> dict:
  """``"a=b,c=d"`` -> ``{"a": kind("b"), "c": kind("d")}``."""
  out = {}
  for item in filter(None, (p.strip() for p in spec.split(","))):
    name, sep, value = item.partition("=")
    if not sep or not name.strip() or not value.strip():
      raise ValueError(f"{what} {item!r}: expected name=value")
    try:
      out[name.strip()] = kind(value.strip())
    except ValueError:
      raise ValueError(f"{what} {item!r}: {value.strip()!r} is not a {kind.__name__}") from None
  return out


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--src", required=True, help="source corpus (train/, validation/)")
  parser.add_argument("--out", required=True, help="the coarse corpus to write")
  parser.add_argument("--merge", required=True,
                      help="hidden=host,...: in train, hidden's documents take host's label")
  parser.add_argument("--keep", default="",
                      help="source=fraction,...: keep this share of a source's training documents")
  parser.add_argument("--seed", type=int, default=0, help="fixes the --keep subsample")
  parser.add_argument("--domain_field", default="auto",
                      help="dotted path of the label (as pretrain.py's --domain_field)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  args = parser.parse_args(argv)
  try:
    manifest = write_coarse_corpus(
        args.src, args.out, parse_pairs(args.merge, str, "--merge"),
        keep_fraction=parse_pairs(args.keep, float, "--keep"), seed=args.seed,
        domain_field=args.domain_field, overwrite=args.overwrite)
  except (ValueError, FileExistsError, FileNotFoundError) as e:
    parser.error(str(e))
  print(f"{'source':<12}{'label':>12}{'train docs':>12}{'of':>6}{'train MB':>10}"
        f"{'share':>8}{'val docs':>10}{'val MB':>9}")
  for name, t in manifest["train"].items():
    v = manifest["validation"].get(name, {"docs": 0, "bytes": 0})
    print(f"{name:<12}{t['label']:>12}{t['docs']:>12}{t['docs_in']:>6}{t['bytes'] / 1e6:>10.3f}"
          f"{manifest['train_byte_shares'][name]:>8.3f}{v['docs']:>10}{v['bytes'] / 1e6:>9.3f}")
  for hidden, h in manifest["hidden"].items():
    print(f"hidden: {hidden} in {h['label']}: {h['share_of_label']:.3f} of the label's "
          f"training text, {h['share_of_train']:.3f} of all of it")
  skipped = {s: n for s, n in manifest["skipped"].items() if n}
  if skipped:
    print("skipped (as the trainer would): " + json.dumps(skipped))
  print(f"wrote {args.out} (manifest.json)")
  return manifest


if __name__ == "__main__":
  main()
