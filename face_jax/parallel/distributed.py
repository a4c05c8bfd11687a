"""Multi-host start-up, and keeping logs and metrics to process 0.

On a TPU pod slice or a GPU cluster, one Python process runs per host (or
per GPU), all running the same program. `maybe_initialize` joins them into
one JAX runtime when `config.mesh.distributed` is set; afterwards
`jax.devices()` lists the devices of every host and the mesh spans them.

How the training loop uses this module:

    maybe_initialize(config.mesh)  # first, before anything touches devices
    quiet_other_processes()        # INFO logs from process 0 only
    ...
    if is_main_process():          # metrics, TensorBoard, config copy
      writer.write_scalars(step, metrics)

Checkpoint saves and restores are collective: every process calls them (orbax
writes each process's shards and coordinates the commit); never guard them
with `is_main_process`.
"""

from __future__ import annotations

import logging as std_logging

import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils

from face_jax.parallel.mesh import ShardingError


def maybe_initialize(mesh_config: ml_collections.ConfigDict) -> bool:
  """Calls `jax.distributed.initialize` when `mesh_config.distributed`.

  With no overrides JAX finds the coordinator, process count and index
  itself on Cloud TPU, SLURM, Open MPI and Kubernetes (GKE). The overrides
  name them explicitly (a SLURM script may pass the first node's address).

  Args:
    mesh_config: the `mesh` section: `distributed` (bool),
      `coordinator_address` ("host:port", "" to detect), `num_processes`
      (0 to detect) and `process_id` (-1 to detect).

  Returns:
    True when this process is part of a multi-process runtime.

  Raises:
    ShardingError: for a process_id outside 0..num_processes - 1.
  """
  if not mesh_config.distributed:
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs = {}
  if mesh_config.coordinator_address:
    kwargs["coordinator_address"] = mesh_config.coordinator_address
  if mesh_config.num_processes > 0:
    kwargs["num_processes"] = mesh_config.num_processes
  if mesh_config.process_id >= 0:
    kwargs["process_id"] = mesh_config.process_id
  both_given = "process_id" in kwargs and "num_processes" in kwargs
  if both_given and kwargs["process_id"] >= kwargs["num_processes"]:
    raise ShardingError(
      f"mesh.process_id={kwargs['process_id']} is not below "
      f"mesh.num_processes={kwargs['num_processes']}; number processes "
      "from 0."
    )
  jax.distributed.initialize(**kwargs)
  logging.info(
    "Process %d of %d: %d local devices, %d in all.",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True


def is_main_process() -> bool:
  """Whether this is process 0, the one that writes logs and metrics."""
  return jax.process_index() == 0


def sync_processes(name: str) -> None:
  """Waits until every process of the job has reached this call.

  Call it on every process after process 0 alone wrote a file that the
  others read next (a finished stage's results): past the barrier the file
  is there for all of them. Nothing happens in a single-process job.

  Args:
    name: the same string on every process, naming the barrier.
  """
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class _OtherProcessFilter(std_logging.Filter):
  """Drops records below a level on every process but process 0."""

  def __init__(self, min_level: int):
    super().__init__()
    self.min_level = min_level
    self.main = is_main_process()

  def filter(self, record: std_logging.LogRecord) -> bool:
    return self.main or record.levelno >= self.min_level


def quiet_other_processes(min_level: int = std_logging.WARNING) -> None:
  """Keeps absl logging below `min_level` to process 0.

  Warnings and errors still come from every process, so a failing host is
  seen. Call it after `maybe_initialize`; calling it again replaces the
  level.

  Args:
    min_level: the lowest level that processes other than 0 still log.
  """
  # The absl logger filters what absl.logging writes wherever it goes; the
  # absl handler also catches libraries logging through Python's logging.
  for target in (logging.get_absl_logger(), logging.get_absl_handler()):
    for existing in list(target.filters):
      if isinstance(existing, _OtherProcessFilter):
        target.removeFilter(existing)
    target.addFilter(_OtherProcessFilter(min_level))
