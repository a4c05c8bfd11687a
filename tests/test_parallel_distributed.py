"""Multi-process start-up: two CPU processes joined into one runtime."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from configs import base
from face_jax import parallel

_ROOT = pathlib.Path(__file__).resolve().parents[1]

# One process of a 2-process job with 2 CPU devices each, configured the
# way the launch scripts configure face_jax.main.
_WORKER = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec
from configs import base
from face_jax import parallel

config = base.get_base_config()
config.mesh.distributed = True
config.mesh.coordinator_address = sys.argv[1]
config.mesh.num_processes = 2
config.mesh.process_id = int(sys.argv[2])
logging.use_absl_handler()
logging.set_verbosity(logging.INFO)
assert parallel.maybe_initialize(config.mesh)
parallel.quiet_other_processes()
logging.info("info from process %d", jax.process_index())
logging.warning("warning from process %d", jax.process_index())
mesh = parallel.make_mesh(config.mesh)
rules = config.mesh.rules
values = parallel.shard_tree(np.arange(8.0), mesh, rules, ("batch",))
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))(
  values
)
print(json.dumps({
  "mesh": dict(mesh.shape),
  "processes": jax.process_count(),
  "devices": jax.device_count(),
  "local_rows": sorted(
    int(s.data[0]) for s in values.addressable_shards
  ),
  "main": parallel.is_main_process(),
  "sum": float(total.addressable_data(0)),
}))
"""


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_form_one_mesh_and_only_process_0_logs_info():
  env = {
    **os.environ,
    "PYTHONPATH": str(_ROOT),
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
  }
  address = f"localhost:{_free_port()}"
  workers = [
    subprocess.Popen(
      [sys.executable, "-c", _WORKER, address, str(process)],
      cwd=_ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for process in (0, 1)
  ]
  outputs = []
  for worker in workers:
    stdout, stderr = worker.communicate(timeout=180)
    assert worker.returncode == 0, stderr
    outputs.append((json.loads(stdout.strip().splitlines()[-1]), stderr))

  (first, first_log), (second, second_log) = outputs
  for result in (first, second):
    assert result["mesh"] == {"data": 4, "model": 1}
    assert result["processes"] == 2
    assert result["devices"] == 4
    assert result["sum"] == 28.0
  # Each process holds the rows of its own two devices.
  assert first["local_rows"] == [0, 2]
  assert second["local_rows"] == [4, 6]
  assert first["main"] and not second["main"]
  assert "info from process 0" in first_log
  assert "info from process 1" not in second_log
  assert "warning from process 1" in second_log


def test_not_distributed_is_a_no_op():
  assert not parallel.maybe_initialize(base.get_base_config().mesh)
  assert parallel.is_main_process()


def test_process_id_beyond_the_count_raises():
  config = base.get_base_config().mesh
  config.distributed = True
  config.coordinator_address = "localhost:1"
  config.num_processes = 2
  config.process_id = 2
  with pytest.raises(parallel.ShardingError, match="process_id=2 is not"):
    parallel.maybe_initialize(config)
