"""The stages of :func:`~dograph_jax.transform.dograph_transform`, one module each.

One ``update`` runs them top to bottom (docs/method.md §5):

* :mod:`.options` — :class:`~.options.DoGraphOptions`, the transform's keyword
  arguments validated once, and :data:`~.options.STATIC_ARGS`;
* :mod:`.prepare` — per-sample gradients or a
  :class:`~dograph_jax.factored.FactoredGrads` become ``Prepared(z, kept,
  losses, reduce)``: sketches, the samples kept (non-finite policy), their
  losses, and the map ``a_B -> sum_i a_i g_i``;
* :mod:`.domain_modes` — persistent and per-batch domains, each an ``(init,
  step)`` pair over its own state, plus the rule by which the mode turns its
  statistics into weights and coefficients;
* :mod:`.weights` — the objective's solve, anchoring to the running
  frequencies, EMA smoothing and the floor;
* :mod:`.coefficients` — per-sample coefficients ``a_i`` from the domain
  weights.

Every function here is pure and jit-compatible; float hyperparameters may be
traced (they arrive through ``optax.inject_hyperparams``).
"""
