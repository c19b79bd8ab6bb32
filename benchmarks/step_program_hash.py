"""Hash of the lowered train step: did a change alter the program?

Run as ``python benchmarks/step_program_hash.py [--method M] [--update U]``
on two commits. The step of ``experiments/pretrain.py``'s defaults (``mini``,
B 16, T 64, V 2048, K 256, 11 domains) is lowered to StableHLO from abstract
shapes (nothing compiled or run), source locations are stripped, and the
sha256 of the text is printed: equal hashes mean the same program, so any
difference in measured speed is the machine's noise.
"""

from __future__ import annotations

import argparse
import hashlib
import re

import jax
import jax.numpy as jnp

from dograph_jax.train import config, training


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--method", default="dograph")
  parser.add_argument("--update", default="bookkeeping")
  args = parser.parse_args()
  b, t, v = 16, 64, 2048
  cfg = config.make_config(method=args.method, update=args.update, model="mini", batch_size=b,
                           seq_len=t, vocab_size=v, num_domains=11, sketch_dim=256, steps=10)
  _, graphdef, params = training.build_model(cfg, v)
  tx = training.make_optimizer(cfg)
  state = jax.eval_shape(lambda p: training.init_train_state(p, tx, cfg, 5), params)
  batch = {"tokens": jax.ShapeDtypeStruct((b, t + 1), jnp.int32),
           "domain_id": jax.ShapeDtypeStruct((b,), jnp.int32)}
  text = training.make_train_step(graphdef, tx, cfg).lower(state, batch).as_text()
  text = re.sub(r"loc\(.*?\)", "", text)
  print(f"{hashlib.sha256(text.encode()).hexdigest()[:16]} ({len(text):,} characters; "
        f"method {args.method}, update {args.update})")


if __name__ == "__main__":
  main()
