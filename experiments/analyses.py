"""The paper's analyses from finished runs (`dograph-analyses`); `--help` lists the subcommands.

A thin entry point: the code lives in ``dograph_jax.study.analyses`` (installed with the
package), so ``python experiments/analyses.py ...`` and ``dograph-analyses ...``
are the same command.
"""

import sys

from dograph_jax.study.analyses import main

if __name__ == "__main__":
  sys.exit(main())
