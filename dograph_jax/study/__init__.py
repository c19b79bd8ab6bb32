"""Studies on top of the trainer: ``compare`` (methods x seeds), ``sweep``
(hyperparameter grids on one compiled step), ``ablate`` (named
configurations x corpora x seeds) and ``analyses`` (the paper's analyses
from finished runs). Needs the ``train`` extra."""

import importlib.util as _util

_missing = [m for m in ('tyro', 'grain') if _util.find_spec(m) is None]
if _missing:  # a clear message instead of an ImportError deep inside
  raise ImportError(f"dograph_jax.study needs the 'train' extra (missing: {', '.join(_missing)}): "
                    'pip install "dograph_jax[train]"')

