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

* **Each host loads its slice** (the way for the trainer with several
  processes; scales the input pipeline): every host builds the same train
  iterator with its own shard, ``make_train_iterator(packed, B, ...,
  **host_data_shard())`` (:func:`host_data_shard`: grain's
  ``ShardByJaxProcess`` indices), and gets ``B / P`` rows per step, disjoint
  from the other hosts' (see ``dograph_jax.data.make_train_iterator`` for
  what the union is); ``dograph_jax.sharding.shard_host_batch`` (or
  :func:`global_batch`) assembles the hosts' rows into one ``(B, ...)``
  array with ``jax.make_array_from_process_local_data`` (no host holds all
  of it). The iterator states of all hosts are equal step for step, so the
  one saved in the checkpoint (written by process 0) resumes every host.
* **Every host loads the global batch**: the same seeded unsharded iterator
  on every host yields the same batches, and
  ``dograph_jax.sharding.shard_batch`` copies to each host's devices only
  their rows; every host reads all the data. The validation batches are put
  so (every host builds the same ones).

Also for several hosts: write files (logs, TensorBoard, plots, summary) from
the main process only (:func:`is_main_process`; ``dograph_jax/train/tracking.py``'s
``Tracker`` and ``Progress`` are silent elsewhere), and call the checkpointer
from *every* process, into a directory all hosts see: orbax saves and
restores collectively (each process writes the array shards it holds,
process 0 the JSON items and the final rename).
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


def is_main_process() -> bool:
  """True on process 0, the one that writes logs, metrics and summaries.

  Every process of a single-process run is the main one. Call after
  :func:`maybe_initialize_distributed` (before it, every process says 0).
  """
  return jax.process_index() == 0


def host_data_shard() -> dict[str, int]:
  """This process's data shard as keyword arguments of the train iterator.

  ``make_train_iterator(packed, B, ..., **host_data_shard())``: shard
  ``jax.process_index()`` of ``jax.process_count()`` (the indices of grain's
  ``grain.sharding.ShardByJaxProcess``); ``{"shard_index": 0,
  "shard_count": 1}`` in a single-process run, i.e. no sharding. Call after
  :func:`maybe_initialize_distributed`.
  """
  options = grain.sharding.ShardByJaxProcess()
  return {"shard_index": options.shard_index, "shard_count": options.shard_count}


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

  The same as ``dograph_jax.sharding.shard_host_batch`` (kept under this
  name for callers of this module).

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
  return sharding.shard_host_batch(local_batch, mesh)
