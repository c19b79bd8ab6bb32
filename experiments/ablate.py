"""A study: named configurations x corpora x seeds (`dograph-ablate`); `--help` lists its flags.

A thin entry point: the code lives in ``dograph_jax.study.ablate`` (installed with the
package), so ``python experiments/ablate.py ...`` and ``dograph-ablate ...``
are the same command.
"""

import sys

from dograph_jax.study.ablate import main

if __name__ == "__main__":
  sys.exit(main())
