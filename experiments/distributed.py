"""Several processes (hosts) in one run: ``jax.distributed`` and per-host data.

One process drives all the devices of its host; JAX's multi-controller model
makes N hosts one computation when every host runs the **same program**:

1. ``maybe_initialize_distributed()`` first, before any other JAX call (even
   ``jax.devices()``), so that ``jax.devices()`` then lists the devices of
   every host and ``jax.process_index()`` / ``jax.process_count()`` say which
   host this is;
2. one mesh over all of them (``dograph_jax.sharding.make_mesh``, e.g.
   ``data=2,fsdp=8`` for 2 hosts x 8 GPUs: ``fsdp`` is the inner axis, so an
   FSDP group stays within a host and its all-gathers use NVLink);
3. the same jitted step on every host, with the state sharded over the mesh
   and metrics returned replicated, so that every host can read them.

How to run it: start one process per host with the same command and tell
each the coordinator (host 0 and a free port), the number of processes and
its own id::

    # on every host; JAX_PROCESS_ID=0 on the first, 1 on the second, ...
    export JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0
    python experiments/pretrain.py --mesh data=2,fsdp=8 --out_dir /shared/run ...

(``JAX_COORDINATOR_ADDRESS`` and ``JAX_LOCAL_DEVICE_IDS`` are read by JAX
itself; ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` by this module.) Under
Slurm, Open MPI or on Cloud TPU, JAX finds all of it alone: call
``maybe_initialize_distributed(True)`` without those variables. A process
started with none of them is a single-process run and never initialises the
distributed runtime (``jax.distributed.initialize`` would wait for peers).

Data, two ways:

* **Every host loads the global batch** (what ``experiments/pretrain.py``
  does): the same seeded grain iterator on every host yields the same
  batches, and ``dograph_jax.sharding.shard_batch`` copies to each host's
  devices only their rows. Nothing changes in the data pipeline and resume
  is exact, at the cost of every host reading (all of) the data.
* **Each host loads its slice** (scales the input pipeline): shard the
  source by host with grain's sharding options,
  ``grain.sharding.ShardOptions(shard_index=jax.process_index(),
  shard_count=jax.process_count())`` (:func:`host_shard_options`): either
  ``grain.DataLoader(..., shard_options=host_shard_options())`` or, with the
  dataset API, ``grain.MapDataset.source(rows)[o.shard_index::o.shard_count]``
  before shuffling; batch ``host_batch_size(B)`` rows per host; then
  :func:`global_batch` assembles the hosts' rows into one ``(B, ...)`` array
  with ``jax.make_array_from_process_local_data`` (no host holds all of it).

Also for several hosts: write files (logs, TensorBoard, plots, summary) from
``jax.process_index() == 0`` only, into a directory all hosts see for
checkpoints (orbax saves from all processes together).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import grain
import jax

from dograph_jax import sharding

log = logging.getLogger(__name__)

PyTree = Any
COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # host:port of process 0 (read by JAX too)
NUM_PROCESSES = "JAX_NUM_PROCESSES"
PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"${name} must be an integer, got {value!r}.") from None


def maybe_initialize_distributed(enable: bool | None = None,
                                 env: Mapping[str, str] | None = None) -> bool:
  """Initialise ``jax.distributed`` when this is a multi-process run.

  Must run before any other JAX call of the process.

  Args:
    enable: ``None`` (default) initialises iff ``$JAX_COORDINATOR_ADDRESS``
      is set or ``$JAX_NUM_PROCESSES`` > 1; ``True`` always (the variables
      left unset are auto-detected by JAX under Slurm, Open MPI, Cloud TPU);
      ``False`` never.
    env: the environment to read (default ``os.environ``).

  Returns:
    True if the distributed runtime is initialised (now or before).

  Raises:
    ValueError: a malformed ``$JAX_NUM_PROCESSES`` / ``$JAX_PROCESS_ID``.
  """
  env = os.environ if env is None else env
  if enable is False:
    return False
  if jax.distributed.is_initialized():
    return True
  address = env.get(COORDINATOR, "").strip() or None
  num_processes = _env_int(env, NUM_PROCESSES)
  process_id = _env_int(env, PROCESS_ID)
  if enable is None and address is None and (num_processes or 1) <= 1:
    return False  # one process: nothing to coordinate
  jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                             process_id=process_id)
  log.info("jax.distributed: process %d of %d, %d local / %d global devices",
           jax.process_index(), jax.process_count(), jax.local_device_count(),
           jax.device_count())
  return True


def host_shard_options(drop_remainder: bool = True) -> grain.sharding.ShardOptions:
  """This host's share of the data: shard ``process_index`` of ``process_count``.

  ``drop_remainder=True`` gives every host the same number of records, so
  that no host runs out (and stops the collective step) before the others.
  Call after :func:`maybe_initialize_distributed`.
  """
  return grain.sharding.ShardOptions(shard_index=jax.process_index(),
                                     shard_count=jax.process_count(),
                                     drop_remainder=drop_remainder)


def host_batch_size(global_batch_size: int) -> int:
  """Rows each host loads per step for a global batch of ``global_batch_size``."""
  n = jax.process_count()
  if global_batch_size % n:
    raise ValueError(f"global batch {global_batch_size} is not divisible by the "
                     f"{n} processes.")
  return global_batch_size // n


def global_batch(local_batch: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
  """One global batch, rows over all devices, from each host's own rows.

  Args:
    local_batch: this host's ``host_batch_size(B)`` rows (numpy leaves with a
      leading row axis); hosts must pass different rows, their union is the
      batch.
    mesh: from ``dograph_jax.sharding.make_mesh``.

  Returns:
    Leaves of global shape ``(B, ...)`` sharded as
    ``dograph_jax.sharding.batch_sharding(mesh)``; with one process, the
    same as ``shard_batch``.
  """
  target = sharding.batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(target, x),
                      local_batch)
