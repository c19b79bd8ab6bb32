"""Data-parallel + FSDP sharding of the train state and batches (``jax.sharding``).

The mesh has two axes:

* ``data`` — pure data parallelism: each slice holds a full copy of what is
  not sharded over ``fsdp`` and sees its own part of the batch;
* ``fsdp`` — fully-sharded data parallelism: parameters and the optimizer
  moments that mirror them are split over it, XLA all-gathers a parameter
  before its use and reduce-scatters its gradient; the batch is split over it
  too, so that no device computes what another one already does.

``fsdp`` is the inner (fastest-varying) axis of the device array, so its
groups are neighbouring devices (on GPUs, those of one host while ``fsdp``
is at most the GPUs per host): its all-gathers, issued for every layer of
every step, travel over the fastest links (NVLink), while ``data`` only
needs the gradient reduction across groups.

Axis types: the mesh is built with ``AxisType.Auto`` on both axes, i.e.
classic GSPMD, on purpose. ``jax.make_mesh`` defaults to ``Explicit`` axes in
jax 0.10, where the sharding of every intermediate is part of its type and an
operation whose output sharding is ambiguous is an error rather than a choice
of the compiler. The train step written for one device then fails under an
explicit mesh (checked with jax 0.10.2 on this model):
``vmap(grad)`` over a batch sharded on ``("data", "fsdp")`` refuses parameters
sharded over the same ``fsdp`` axis ("Unmapped values passed to vmap cannot be
sharded along the mesh axis you are vmapping over"), and with the batch on
``data`` only, the token-embedding lookup asks for ``.at[].get(out_sharding=)``.
Under ``Auto`` the unchanged train step (uniform, and DoGraph's reference
and factored paths: per-sample gradients or taps, the sketch, K-means on the
gathered sketches, the weight solve) partitions without a single annotation
and gives the single-device results up to the order of floating-point sums
(``tests/test_sharding.py``). Only the inputs and outputs of the step carry
shardings, the ones built here. Pin the outputs too: left to itself, GSPMD
returned DoGraph's per-sample assignments sharded over the batch, not
replicated as they came in, so the second step saw new input shardings and
compiled again.

Typical use (one process; see ``dograph_jax/train/distributed.py`` for several)::

    mesh = make_mesh("data=4,fsdp=2")                     # 8 devices
    state_sharding = state_shardings(state, mesh)
    state = jax.device_put(state, state_sharding)
    step = jax.jit(step_fn, donate_argnums=0,
                   in_shardings=(state_sharding, batch_sharding(mesh)),
                   out_shardings=(state_sharding, replicated(mesh)))
    state, metrics = step(state, shard_batch(batch, mesh))  # B rows over 8 devices
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

PyTree = Any

AXES = ("data", "fsdp")
# Leaves with fewer elements than this stay replicated: sharding a LayerNorm
# scale or a bias saves almost no memory and adds one collective per leaf.
MIN_SHARD_SIZE = 2**10


def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
  """``"data=4,fsdp=2"`` (or ``{"data": 4, "fsdp": 2}``) -> ``{"data": 4, "fsdp": 2}``.

  A missing axis has size 1; one axis may be ``-1``, meaning "all the devices
  the other axis leaves" (resolved by :func:`make_mesh`).

  Raises:
    ValueError: unknown or repeated axis, a malformed entry, a size that is
      not a positive integer (or ``-1``), or more than one ``-1``.
  """
  if isinstance(spec, str):
    items = []
    for entry in (e.strip() for e in spec.split(",")):
      name, sep, value = entry.partition("=")
      if not sep or not name.strip() or not value.strip():
        raise ValueError(f"mesh spec {spec!r}: entry {entry!r} is not 'axis=size' "
                         f"(expected e.g. 'data=4,fsdp=2').")
      items.append((name.strip(), value.strip()))
  else:
    items = list(dict(spec).items())
  if not items:
    raise ValueError("mesh spec is empty; expected e.g. 'data=4,fsdp=2'.")
  sizes: dict[str, int] = {}
  for name, value in items:
    if name not in AXES:
      raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {AXES}.")
    if name in sizes:
      raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice.")
    try:
      size = int(value)
    except (TypeError, ValueError):
      raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be an integer, "
                       f"got {value!r}.") from None
    if size < 1 and size != -1:
      raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be >= 1 (or -1 "
                       f"for the remaining devices), got {size}.")
    sizes[name] = size
  if list(sizes.values()).count(-1) > 1:
    raise ValueError(f"mesh spec {spec!r}: at most one axis may be -1.")
  return {name: sizes.get(name, 1) for name in AXES}


def make_mesh(spec: str | Mapping[str, int], devices=None) -> Mesh:
  """A ``("data", "fsdp")`` mesh of ``Auto`` axes over all (or the given) devices.

  Args:
    spec: ``"data=4,fsdp=2"``-style string or a mapping (see
      :func:`parse_mesh_spec`); the product of the sizes must equal the
      number of devices.
    devices: optional device list (default ``jax.devices()``: every device
      of every process).

  Returns:
    ``jax.sharding.Mesh`` with axis names ``("data", "fsdp")`` and types
    ``(AxisType.Auto, AxisType.Auto)`` (why Auto: module docstring).

  Raises:
    ValueError: a malformed spec, or sizes that do not multiply to the
      device count.
  """
  sizes = parse_mesh_spec(spec)
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  known = math.prod(s for s in sizes.values() if s != -1)
  if -1 in sizes.values():
    if n % known:
      raise ValueError(f"mesh spec {spec!r}: {n} devices cannot be split with the "
                       f"other axis of size {known}.")
    sizes = {k: (n // known if s == -1 else s) for k, s in sizes.items()}
  shape = tuple(sizes[a] for a in AXES)
  if math.prod(shape) != n:
    raise ValueError(
        f"mesh spec {spec!r} asks for data={shape[0]} x fsdp={shape[1]} = "
        f"{math.prod(shape)} devices, but there are {n} "
        f"({devices[0].platform}); the product must equal the device count.")
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``("data", "fsdp")``, i.e. all devices.

  Over both axes, not ``data`` alone: the devices of one ``fsdp`` group hold
  different parameter shards but gather the same full parameters for
  compute, so they must see different samples or they repeat each other's
  work. ``B`` must be a multiple of the device count.
  """
  return NamedSharding(mesh, P(AXES))


def _leaf_sharding(shape: tuple[int, ...], mesh: Mesh, fsdp: bool,
                   min_size: int) -> NamedSharding:
  n = mesh.shape["fsdp"]
  if not fsdp or n == 1 or math.prod(shape) < min_size:
    return replicated(mesh)
  # The largest dimension divisible by n (the first one on ties): the most
  # even split, and for a (V, D) embedding the vocabulary rows.
  candidates = [d for d in range(len(shape)) if shape[d] % n == 0]
  if not candidates:
    return replicated(mesh)
  dim = max(candidates, key=lambda d: shape[d])
  spec = [None] * len(shape)
  spec[dim] = "fsdp"
  return NamedSharding(mesh, P(*spec))


def param_shardings(params: PyTree, mesh: Mesh, fsdp: bool = True,
                    min_size: int = MIN_SHARD_SIZE) -> PyTree:
  """A ``NamedSharding`` per parameter: FSDP over ``fsdp``, else replicated.

  A leaf is split along its largest dimension divisible by the ``fsdp`` size;
  it stays replicated when ``fsdp`` is False or the axis has size 1 (pure
  data parallelism), when it has fewer than ``min_size`` elements, or when
  no dimension divides. Never over ``data``: that axis replicates the model.

  Args:
    params: pytree of arrays or ``jax.ShapeDtypeStruct`` (only shapes are read).
    mesh: from :func:`make_mesh`.
    fsdp: shard at all.
    min_size: smallest leaf (in elements) worth sharding.

  Returns:
    A pytree like ``params`` of ``NamedSharding``.
  """
  return jax.tree.map(lambda x: _leaf_sharding(tuple(np.shape(x)), mesh, fsdp, min_size),
                      params)


def state_shardings(state: PyTree, mesh: Mesh, *, params: PyTree | None = None,
                    fsdp: bool = True, min_size: int = MIN_SHARD_SIZE) -> PyTree:
  """Shardings of a whole train state: params-like subtrees as params, rest replicated.

  A subtree with the structure and leaf shapes of ``params`` (the parameters
  themselves, AdamW's ``mu`` and ``nu``) gets :func:`param_shardings`; every
  other leaf (step and update counts, PRNG keys, injected hyperparameters,
  DoGraph's centroids ``(M, K)``, weights, buffer, last assignments) is small
  or read whole by every step and is replicated. Matching whole subtrees, not
  single shapes, keeps e.g. a ``(S, K)`` sketch buffer replicated even if it
  happens to have a parameter's shape.

  Args:
    state: e.g. ``{"params", "opt_state", "step"}`` (arrays or
      ``jax.ShapeDtypeStruct``).
    mesh: from :func:`make_mesh`.
    params: the parameter pytree to match; default ``state["params"]``.
    fsdp, min_size: as in :func:`param_shardings`.

  Returns:
    A pytree like ``state`` of ``NamedSharding`` (``None`` where ``state``
    has ``None``), usable with ``jax.device_put`` and as ``jax.jit``
    ``in_shardings``/``out_shardings``.
  """
  params = state["params"] if params is None else params
  treedef = jax.tree.structure(params)
  shapes = [np.shape(x) for x in jax.tree.leaves(params)]

  def params_like(node) -> bool:
    return (jax.tree.structure(node) == treedef
            and [np.shape(x) for x in jax.tree.leaves(node)] == shapes)

  def assign(node):
    if params_like(node):
      return param_shardings(node, mesh, fsdp, min_size)
    return replicated(mesh)

  return jax.tree.map(assign, state, is_leaf=params_like)


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
  """Put a global batch on the mesh, rows split over all devices.

  Every leaf has the leading batch axis ``B`` (a multiple of the device
  count). With one process this is ``jax.device_put``. With several, every
  process must pass the same global batch (e.g. the same seeded iterator)
  and copies only the rows of its own devices; ``device_put`` would also do,
  but checks that all processes agree with a collective on every call. For
  per-host loading, where each process reads only its rows, use
  :func:`shard_host_batch` instead.

  Raises:
    ValueError: a leaf without a leading axis divisible by the device count.
  """
  sharding = batch_sharding(mesh)
  n = mesh.size
  for x in jax.tree.leaves(batch):
    if np.ndim(x) == 0 or np.shape(x)[0] % n:
      raise ValueError(
          f"shard_batch: every leaf needs a leading batch axis divisible by the "
          f"{n} devices of the mesh {dict(mesh.shape)}; got shape {np.shape(x)}.")
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(np.shape(x), sharding,
                                             lambda index: np.asarray(x[index])),
      batch)


def shard_host_batch(local_batch: PyTree, mesh: Mesh) -> PyTree:
  """One global batch, rows over all devices, from each process's own rows.

  For per-host loading (``make_train_iterator(..., shard_index=
  jax.process_index(), shard_count=jax.process_count())``): every process
  passes a *different* ``B / P`` rows (``P`` processes, the same number on
  each) and no process ever holds the whole batch;
  ``jax.make_array_from_process_local_data`` places this process's rows on
  its own devices, keeping their order, and the global array has ``B``
  rows. Which positions of the global batch a process's rows take follows
  the mesh's device order (with ``jax.make_mesh``, process ``p`` normally
  holds rows ``[p B / P, (p + 1) B / P)``); nothing in a train step depends
  on the order of the rows of a batch.

  With one process the local batch *is* the global batch and this equals
  :func:`shard_batch`. Contrast :func:`shard_batch`, whose multi-process
  form expects every process to pass the same global batch.

  Args:
    local_batch: pytree of arrays with a leading row axis of the same size
      ``B / P`` on every process, a multiple of this process's devices in
      the mesh.
    mesh: from :func:`make_mesh`, over the devices of every process.

  Returns:
    The pytree with leaves of global shape ``(B, ...)``, ``B = P * B / P``,
    sharded as :func:`batch_sharding`.

  Raises:
    ValueError: a leaf without a leading axis divisible by this process's
      device count in the mesh.
  """
  sharding = batch_sharding(mesh)
  local = len(mesh.local_devices)
  for x in jax.tree.leaves(local_batch):
    if np.ndim(x) == 0 or np.shape(x)[0] % local:
      raise ValueError(
          f"shard_host_batch: every leaf needs a leading batch axis divisible by "
          f"this process's {local} devices of the mesh {dict(mesh.shape)}; got "
          f"shape {np.shape(x)}.")
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                      local_batch)
