"""Studies on top of the trainer: ``compare`` (methods x seeds), ``sweep``
(hyperparameter grids on one compiled step), ``ablate`` (named
configurations x corpora x seeds) and ``analyses`` (the paper's analyses
from finished runs). Needs the ``train`` extra."""
