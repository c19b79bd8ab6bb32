"""Compare methods over seeds on one corpus (`dograph-compare`); `--help` lists its flags.

A thin entry point: the code lives in ``dograph_jax.study.compare`` (installed with the
package), so ``python experiments/compare.py ...`` and ``dograph-compare ...``
are the same command.
"""

import sys

from dograph_jax.study.compare import main

if __name__ == "__main__":
  sys.exit(main())
