"""Throughput of the lm-eval adapter (``dograph_jax.eval.lm_eval_model.FlaxLM``).

    python benchmarks/bench_eval.py                 # mini, CPU defaults
    python benchmarks/bench_eval.py --model gpt2 --batch_size 32 --requests 512

A randomly initialised model of ``--model`` with a byte-level BPE tokenizer
trained on the bundled synthetic corpus's text (vocabulary ``--vocab_size``);
the requests are that corpus's validation documents:

* ``loglikelihood``: multiple-choice-like requests, a context of 20–60 words
  and a 1–5 word continuation;
* ``loglikelihood_rolling``: whole documents (several windows when longer
  than the context);
* ``generate_until``: greedy, ``--gen_toks`` new tokens, stop at a newline.

Each kind is run once to compile (every length bucket it uses), then timed
``--repeats`` times; the median requests per second is printed (and the
number of traces, which must not grow after the first pass).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


import jax
import numpy as np
from flax import nnx

from dograph_jax.data import read_split, train_bpe_tokenizer, write_synthetic_corpus
from dograph_jax.models import GPT2, get_config, split_model
from dograph_jax.eval.lm_eval_model import FlaxLM


class _Request:
  def __init__(self, *args):
    self.args = args


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="mini")
  parser.add_argument("--vocab_size", type=int, default=2048)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--requests", type=int, default=256)
  parser.add_argument("--gen_toks", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  with tempfile.TemporaryDirectory() as tmp:
    corpus = write_synthetic_corpus(Path(tmp) / "corpus", seed=args.seed, total_docs=1500)
    train, _ = read_split(corpus, "train")
    val, _ = read_split(corpus, "validation")
    tokenizer = train_bpe_tokenizer((t for docs in train.values() for t in docs), None,
                                    vocab_size=args.vocab_size)
  config = get_config(args.model, vocab_size=len(tokenizer))
  graphdef, params = split_model(GPT2(config, rngs=nnx.Rngs(args.seed)))
  lm = FlaxLM(graphdef, params, tokenizer, config.n_positions, batch_size=args.batch_size,
              max_gen_toks=args.gen_toks)
  docs = [d for texts in val.values() for d in texts]
  rng = np.random.default_rng(args.seed)
  words = [w for d in docs for w in d.split()]

  def mc_request():
    start = int(rng.integers(0, len(words) - 70))
    n_ctx, n_cont = int(rng.integers(20, 61)), int(rng.integers(1, 6))
    return _Request(" ".join(words[start:start + n_ctx]),
                    " " + " ".join(words[start + n_ctx:start + n_ctx + n_cont]))

  n_gen = max(args.requests // 8, args.batch_size)
  kinds = {
      "loglikelihood": (lm.loglikelihood, [mc_request() for _ in range(args.requests)]),
      "loglikelihood_rolling": (lm.loglikelihood_rolling,
                                [_Request(docs[i % len(docs)]) for i in range(args.requests)]),
      "generate_until": (lm.generate_until,
                         [_Request(mc_request().args[0], {"until": ["\n"],
                                                          "max_gen_toks": args.gen_toks})
                          for _ in range(n_gen)]),
  }
  print(f"jax {jax.__version__}, {jax.default_backend()} ({jax.devices()[0].device_kind}); "
        f"model {args.model} ({config.n_layer} layers, d {config.d_model}, context "
        f"{config.n_positions}, vocab {config.vocab_size}); batch {args.batch_size}; "
        f"buckets {lm.buckets}")
  print(f"{'request kind':<24} {'requests':>8} {'req/s (median)':>15} {'min s':>8} "
        f"{'traces':>7}")
  for name, (fn, requests) in kinds.items():
    fn(requests)  # compile every bucket this kind uses
    traces = len(lm.traces)
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      fn(requests)
      times.append(time.perf_counter() - t0)
    assert len(lm.traces) == traces, "a timed pass compiled again"
    print(f"{name:<24} {len(requests):>8} {len(requests) / statistics.median(times):>15.1f} "
          f"{min(times):>8.3f} {traces:>7}")


if __name__ == "__main__":
  main()
