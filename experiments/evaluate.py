"""Evaluate a run on lm-evaluation-harness tasks (`dograph-evaluate`); `--help` lists its flags.

A thin entry point: the code lives in ``dograph_jax.eval.evaluate`` (installed with the
package), so ``python experiments/evaluate.py ...`` and ``dograph-evaluate ...``
are the same command.
"""

import sys

from dograph_jax.eval.evaluate import main

if __name__ == "__main__":
  sys.exit(main())
