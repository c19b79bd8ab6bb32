"""Pretrain a model with DoGraph or a baseline (`dograph-pretrain`); `--help` lists every option.

A thin entry point: the code lives in ``dograph_jax.train.pretrain`` (installed with the
package), so ``python experiments/pretrain.py ...`` and ``dograph-pretrain ...``
are the same command.
"""

import sys

from dograph_jax.train.pretrain import main

if __name__ == "__main__":
  sys.exit(main())
