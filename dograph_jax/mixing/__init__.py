"""Data-mixing methods behind one interface (see :mod:`dograph_jax.mixing.base`).

Online mixers (``factory(num_domains, **hyperparameters) -> OnlineMixer``):

* :func:`uniform` — the batch mean;
* :func:`loss_reweighting` — Dynamic Loss-Based sample reweighting (Sow et al. 2025);
* :func:`group_dro` — Group DRO (Sagawa et al. 2020);
* :func:`aioli` — Aioli (Chen et al. 2025);
* :func:`doremi` — DoReMi's proxy-run rule (Xie et al. 2023);
* :func:`doge` — DoGE's proxy-run rule (Fan et al. 2024);
* :func:`rnb` — R&B's round rule on regrouped clusters (Ge et al. 2025);
* :func:`odm` — Online Data Mixing, an EXP3 bandit rewarded by the loss (Albalak et al. 2023);
* :func:`ado` — Adaptive Data Optimization, per-domain scaling laws fitted online
  (Jiang et al. 2025).

Offline fits (host-side numpy/scipy/scikit-learn): :mod:`~dograph_jax.mixing.regmix`
(RegMix, Liu et al. 2024), :mod:`~dograph_jax.mixing.mixing_law` (Data
Mixing Laws, Ye et al. 2024), :mod:`~dograph_jax.mixing.temperature`
(temperature sampling with UniMax's epoch cap) and
:mod:`~dograph_jax.mixing.regroup` (R&B's regrouping). DoGraph itself is
:func:`dograph_jax.dograph_transform`.
"""

from dograph_jax.mixing.ado import ado
from dograph_jax.mixing.aioli import aioli
from dograph_jax.mixing.base import (MixingInputs, OnlineMixer, domain_counts, domain_means,
                                     domain_to_sample_weights, mean_sample_weights)
from dograph_jax.mixing.doge import doge
from dograph_jax.mixing.doremi import doremi
from dograph_jax.mixing.group_dro import group_dro
from dograph_jax.mixing.loss_reweighting import loss_reweighting
from dograph_jax.mixing.odm import odm
from dograph_jax.mixing.rnb import rnb
from dograph_jax.mixing.uniform import uniform

__all__ = ["MixingInputs", "OnlineMixer", "ado", "aioli", "doge", "domain_counts",
           "domain_means", "domain_to_sample_weights", "doremi", "group_dro", "loss_reweighting",
           "mean_sample_weights", "odm", "rnb", "uniform"]
