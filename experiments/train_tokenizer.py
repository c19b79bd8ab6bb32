"""Trains a byte-level BPE tokenizer on a corpus's train split, offline.

Run::

  python experiments/train_tokenizer.py --data_dir data/synthetic \
      --out data/synthetic/tokenizer --vocab_size 2048

Reads ``<data_dir>/train`` with ``dograph_jax.data.read_split`` (SlimPajama
or plain schema), trains on every document of every domain, saves with
``save_pretrained`` into ``--out``, and prints a short encode/decode check.
"""

from __future__ import annotations

import argparse
import logging
import time

from dograph_jax.data import load_tokenizer, read_split, train_bpe_tokenizer


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True,
                      help="corpus root holding train/")
  parser.add_argument("--out", required=True, help="folder to save into")
  parser.add_argument("--vocab_size", type=int, default=2048)
  parser.add_argument("--min_frequency", type=int, default=2)
  parser.add_argument("--split", default="train")
  parser.add_argument("--domain_field", default="auto",
                      help="dotted path of the domain, or 'auto'")
  parser.add_argument("--text_field", default="text")
  args = parser.parse_args(argv)
  logging.basicConfig(format="%(levelname)s %(message)s")
  # Some imports (absl, via grain) install a root handler first, which makes
  # basicConfig a no-op; raising our own logger's level works either way.
  logging.getLogger("dograph_jax").setLevel(logging.INFO)

  t0 = time.perf_counter()
  docs, _ = read_split(args.data_dir, args.split,
                       domain_field=args.domain_field,
                       text_field=args.text_field)
  texts = [t for domain_docs in docs.values() for t in domain_docs]
  n_bytes = sum(len(t.encode("utf-8")) for t in texts)
  tokenizer = train_bpe_tokenizer(texts, args.out, vocab_size=args.vocab_size,
                                  min_frequency=args.min_frequency)
  # Reload from disk: what the trainer will see.
  tokenizer = load_tokenizer(args.out)
  n_tokens = sum(len(ids) for ids in tokenizer(
      texts, add_special_tokens=False, verbose=False)["input_ids"])
  sample = texts[0][:80]
  ok = tokenizer.decode(tokenizer.encode(sample)) == sample
  print(f"trained on {len(texts)} documents ({n_bytes / 1e6:.2f} MB, "
        f"{len(docs)} domains) in {time.perf_counter() - t0:.1f} s")
  print(f"vocabulary {len(tokenizer)}, eos {tokenizer.eos_token!r} = "
        f"{tokenizer.eos_token_id}, {n_bytes / max(n_tokens, 1):.2f} bytes per "
        f"token, round trip {'ok' if ok else 'FAILED'}; saved to {args.out}")


if __name__ == "__main__":
  main()
