"""Time to train the byte-level BPE tokenizer on one whitespace-free document.

    python benchmarks/bench_tokenizer.py                        # 50k, 100k, 200k, 5M
    python benchmarks/bench_tokenizer.py --sizes 50000,200000   # a quick check
    python benchmarks/bench_tokenizer.py --max_run 0 --sizes 50000,100000,200000
    python benchmarks/bench_tokenizer.py --kind base64

One document of ``--sizes`` characters without whitespace (``acgt``: random
A/C/G/T, like unwrapped DNA; ``base64``: random bytes in base64) is given to
:func:`dograph_jax.data.train_bpe_tokenizer` (vocabulary ``--vocab_size``,
nothing saved); the wall-clock time of each size is printed, with the
seconds per MB, so the curve shows whether training is linear.

``--max_run`` is the longest run the trainer is given (default: the
library's ``MAX_TRAIN_RUN``); 0 gives the document to the trainer whole, as
before runs were cut: superlinear (2.3 s at 50k, 17.9 s at 200k and more than
400 s at 5 MB were measured on ACGT), so keep the sizes small with it.

The ``acgt`` document is the pathological one: the byte-level pre-tokenizer
splits text where letters, digits and symbols meet, so base64 already reaches
the trainer in short pieces, whereas DNA is a single run of letters.
"""

from __future__ import annotations

import argparse
import base64
import logging
import time

import numpy as np

from dograph_jax.data.tokenizer import MAX_TRAIN_RUN, train_bpe_tokenizer


def make_document(kind: str, n_chars: int, seed: int = 0) -> str:
  """A whitespace-free document of exactly ``n_chars`` characters."""
  rng = np.random.default_rng(seed)
  if kind == "acgt":
    return np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, n_chars)].tobytes().decode()
  if kind == "base64":
    return base64.b64encode(rng.bytes(n_chars // 4 * 3 + 3)).decode()[:n_chars]
  raise ValueError(f"unknown --kind {kind!r} (acgt or base64)")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="50000,100000,200000,5000000",
                      help="comma-separated document lengths in characters")
  parser.add_argument("--kind", default="acgt", choices=("acgt", "base64"))
  parser.add_argument("--vocab_size", type=int, default=2048)
  parser.add_argument("--max_run", type=int, default=MAX_TRAIN_RUN,
                      help="longest run given to the trainer; 0: the document whole")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--verbose", action="store_true",
                      help="show the tokenizer's progress lines")
  args = parser.parse_args(argv)
  if args.verbose:
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    # An import may have installed a root handler first (absl, via grain),
    # which makes basicConfig a no-op; our logger's level works either way.
    logging.getLogger("dograph_jax").setLevel(logging.INFO)

  # The first call imports transformers and tokenizers' backends: not timed.
  train_bpe_tokenizer(["warm up " * 100], None, vocab_size=300)
  print(f"kind {args.kind}, vocab {args.vocab_size}, max_run "
        f"{args.max_run or 'none (whole document)'}")
  print(f"{'chars':>10}  {'seconds':>8}  {'s per MB':>8}")
  for n in (int(x) for x in args.sizes.split(",")):
    doc = make_document(args.kind, n, args.seed)
    # Without a limit, the longest run is the document itself.
    max_run = args.max_run or max(n, 1)
    start = time.perf_counter()
    train_bpe_tokenizer([doc], None, vocab_size=args.vocab_size, max_run=max_run)
    elapsed = time.perf_counter() - start
    print(f"{n:>10}  {elapsed:8.2f}  {elapsed / (n / 1e6):8.2f}", flush=True)


if __name__ == "__main__":
  main()
