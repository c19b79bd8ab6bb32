"""Sweep hyperparameters with one compiled train step (`dograph-sweep`); `--help` lists its flags.

A thin entry point: the code lives in ``dograph_jax.study.sweep`` (installed with the
package), so ``python experiments/sweep.py ...`` and ``dograph-sweep ...``
are the same command.
"""

import sys

from dograph_jax.study.sweep import main

if __name__ == "__main__":
  sys.exit(main())
