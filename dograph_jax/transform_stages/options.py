"""Options of :func:`~dograph_jax.transform.dograph_transform`, validated once.

:class:`DoGraphOptions` holds every keyword argument of the transform.
Defaults live in ``dograph_transform``'s signature only (the trainer's
configuration reads them from there), so the options have none.

Fields marked traced (:func:`_traced`) are the hyperparameters that change no
shape and no Python control flow: ``optax.inject_hyperparams`` may pass them
as traced scalars, so the stages must use them only in ``jnp`` arithmetic.
Every other field is static; :data:`STATIC_ARGS` lists them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax

from dograph_jax import objectives

Scalar = float | jax.Array  # a Python float, or a traced () array


# Sketch dimensions of about equal pairwise-distance distortion for each map
# (benchmarks/sketch_distortion.py: Kronecker needs ~4x the dense dimension).
DEFAULT_SKETCH_DIM = {"gaussian": 256, "kronecker": 1024}


def default_sketch_dim(sketch_kind: str) -> int:
  """``dograph_transform``'s ``sketch_dim`` when none is given."""
  return DEFAULT_SKETCH_DIM.get(sketch_kind, DEFAULT_SKETCH_DIM["gaussian"])


def _traced():
  return dataclasses.field(metadata={"traced": True})


@dataclass(frozen=True)
class DoGraphOptions:
  """``dograph_transform``'s arguments (documented there), validated.

  Raises ``ValueError`` on construction for a bad value; a traced float is
  not range-checked (its value is unknown at trace time), as before.
  """
  num_domains: int
  sketch_dim: int
  objective: str
  domains: str
  prior: str
  seed: int
  sketch_kind: str
  normalize_blocks: bool
  kmeans_iters: int
  distance: str
  warm_start: bool
  buffer_size: int
  batch_size: int | None
  decay: Scalar = _traced()
  anchor: Scalar = _traced()
  max_ratio: Scalar = _traced()
  reseed_fraction: Scalar = _traced()
  ema: Scalar = _traced()
  weight_floor: Scalar = _traced()
  lambda_graph: Scalar = _traced()
  temperature: Scalar = _traced()
  lambda_dir: Scalar = _traced()
  lambda_align: Scalar = _traced()
  eps: Scalar = _traced()
  solver_steps: int
  solver_backend: str
  block_budget: int
  in_batch: bool
  coefficients: str

  def __post_init__(self):
    _validate(self)

  @property
  def persistent(self) -> bool:
    """True for persistent domains, False for per-batch domains."""
    return self.domains == "persistent"

  @property
  def has_buffer(self) -> bool:
    """Batch mode keeps a rolling buffer of ``buffer_size`` sketches."""
    return self.buffer_size > 0

  @property
  def has_batch(self) -> bool:
    """``batch_size`` is known: per-sample diagnostics live in the state."""
    return self.batch_size is not None


# Arguments of `dograph_transform` that fix shapes or Python control flow:
# pass them as `static_args` to `optax.inject_hyperparams`. Derived from the
# options so that a new option is static unless marked traced.
STATIC_ARGS = tuple(f.name for f in dataclasses.fields(DoGraphOptions)
                    if not f.metadata.get("traced"))

# The traced ones (every float hyperparameter).
TRACED_ARGS = tuple(f.name for f in dataclasses.fields(DoGraphOptions)
                    if f.metadata.get("traced"))


def _is_number(x) -> bool:
  # Range checks apply to Python numbers only: a traced value has none yet.
  return isinstance(x, (int, float))


def _validate(o: DoGraphOptions) -> None:
  """The checks (and messages) of ``dograph_transform``, in its order."""
  if not isinstance(o.num_domains, int) or o.num_domains < 1:
    raise ValueError(f"dograph_transform: num_domains must be an int >= 1, "
                     f"got {o.num_domains!r}.")
  if not isinstance(o.sketch_dim, int) or o.sketch_dim < 1:
    raise ValueError(f"dograph_transform: sketch_dim must be an int >= 1, "
                     f"got {o.sketch_dim!r}.")
  if o.objective not in objectives.OBJECTIVES:
    raise ValueError(f"dograph_transform: unknown objective {o.objective!r}; "
                     f"choose one of {objectives.OBJECTIVES}.")
  if o.domains not in ("persistent", "batch"):
    raise ValueError(f"dograph_transform: domains must be 'persistent' or 'batch', "
                     f"got {o.domains!r}.")
  if o.distance not in ("euclidean", "cosine"):
    raise ValueError(f"dograph_transform: unknown distance {o.distance!r}.")
  if o.prior not in ("frequency", "uniform"):
    raise ValueError(f"dograph_transform: prior must be 'frequency' or 'uniform', "
                     f"got {o.prior!r}.")
  if o.sketch_kind not in ("gaussian", "kronecker"):
    raise ValueError(f"dograph_transform: unknown sketch_kind {o.sketch_kind!r}.")
  if o.coefficients not in ("frequency", "post_stratified"):
    raise ValueError(f"dograph_transform: coefficients must be 'frequency' or "
                     f"'post_stratified', got {o.coefficients!r}.")
  if o.coefficients == "post_stratified" and o.domains != "persistent":
    raise ValueError("dograph_transform: coefficients='post_stratified' is an option of "
                     "domains='persistent' (per-batch domains already give a_i = w_j / |C_j|).")
  if o.buffer_size < 0:
    raise ValueError(f"dograph_transform: buffer_size must be >= 0, got {o.buffer_size}.")
  if o.buffer_size and o.domains == "persistent":
    raise ValueError("dograph_transform: buffer_size is an option of domains='batch' "
                     "(persistent domains already pool every batch through their "
                     "running sums); use one or the other.")
  if _is_number(o.ema) and not 0.0 <= o.ema < 1.0:
    raise ValueError(f"dograph_transform: ema must be in [0, 1), got {o.ema}.")
  if _is_number(o.decay) and not 0.0 < o.decay <= 1.0:
    raise ValueError(f"dograph_transform: decay must be in (0, 1], got {o.decay}.")
  if _is_number(o.anchor) and not 0.0 <= o.anchor <= 1.0:
    raise ValueError(f"dograph_transform: anchor must be in [0, 1], got {o.anchor}.")
  if _is_number(o.max_ratio) and not o.max_ratio >= 1.0:
    raise ValueError(f"dograph_transform: max_ratio must be >= 1, got {o.max_ratio}.")
  if _is_number(o.reseed_fraction) and not 0.0 <= o.reseed_fraction < 1.0:
    raise ValueError(f"dograph_transform: reseed_fraction must be in [0, 1), "
                     f"got {o.reseed_fraction}.")
  if (_is_number(o.weight_floor)
      and not 0.0 <= o.weight_floor <= 1.0 / o.num_domains):
    raise ValueError(f"dograph_transform: weight_floor must be in [0, 1/num_domains], "
                     f"got {o.weight_floor}.")
