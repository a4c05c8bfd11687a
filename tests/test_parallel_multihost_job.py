"""The whole job on two processes equals the job on one.

Two CPU processes with 2 devices each join one 4-device runtime through
`python -m face_jax.main` (mesh.distributed), with the user and item tables
sharded over all four devices, so every stage handles arrays that span
both processes: sharded checkpoints written by each process, evaluation,
the descriptor export and quality, and cold start, which gather the tables
to the host. One process with 4 devices runs the same job as the
reference; results and exported files must agree.
"""

import json
import math
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _face_fixtures import text_dataset, write_tiny_bert
from _finished_run import write_rlmrec
from jax.sharding import NamedSharding, PartitionSpec

from face_jax import parallel

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def _numbers(tree, prefix=""):
  """{"a/b/c": number} for the numeric leaves of nested dicts and lists."""
  items = tree.items() if isinstance(tree, dict) else enumerate(tree)
  flat = {}
  for key, value in items:
    name = f"{prefix}{key}"
    if isinstance(value, (dict, list)):
      flat.update(_numbers(value, f"{name}/"))
    elif isinstance(value, (int, float)) and "seconds" not in name:
      flat[name] = value
  return flat


@pytest.mark.slow
def test_two_process_job_matches_one_process(tmp_path):
  write_rlmrec(text_dataset(), tmp_path / "data")
  bert = write_tiny_bert(tmp_path / "bert")
  flags = [
    "--config=configs/tiny.py",
    f"--config.llm.model={bert}",
    f"--config.data.dir={tmp_path / 'data'}",
    # Tables split by rows over all 4 devices, i.e. across the processes.
    "--config.mesh.shape=(1,-1)",
    "--config.cold_start.enabled=True",
    # The tiny split holds 6 cold items.
    "--config.cold_start.ks=(2,5)",
  ]
  address = f"localhost:{_free_port()}"
  runs = {
    "process0": (2, [*flags, "--config.mesh.process_id=0"]),
    "process1": (2, [*flags, "--config.mesh.process_id=1"]),
    "single": (4, flags),
  }
  distributed = [
    "--config.mesh.distributed=True",
    f"--config.mesh.coordinator_address={address}",
    "--config.mesh.num_processes=2",
  ]
  workers = {}
  for name, (devices, run_flags) in runs.items():
    workdir = tmp_path / ("single" if name == "single" else "multi")
    extra = [] if name == "single" else distributed
    env = {
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    workers[name] = subprocess.Popen(
      [
        sys.executable,
        "-m",
        "face_jax.main",
        *run_flags,
        *extra,
        f"--workdir={workdir}",
      ],
      cwd=_ROOT,
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
  logs = {}
  for name, worker in workers.items():
    _, logs[name] = worker.communicate(timeout=600)
    assert worker.returncode == 0, f"{name}:\n{logs[name][-3000:]}"

  multi, single = tmp_path / "multi", tmp_path / "single"
  # Each process wrote its own shards of the sharded checkpoints.
  state = next((multi / "pretrain" / "checkpoints").glob("*/state"))
  assert {path.name for path in state.glob("ocdbt.process_*")} == {
    "ocdbt.process_0",
    "ocdbt.process_1",
  }
  # Only process 0 logs progress.
  assert "pretrain epoch 1" in logs["process0"]
  assert "pretrain epoch 1" not in logs["process1"]

  multi_metrics = _numbers(json.loads((multi / "metrics.json").read_text()))
  single_metrics = _numbers(json.loads((single / "metrics.json").read_text()))
  assert multi_metrics.keys() == single_metrics.keys()
  for stage in ("cold_start/item/face/", "descriptors/retrieval/align/"):
    assert any(name.startswith(stage) for name in multi_metrics), stage
  for name, value in single_metrics.items():
    assert math.isclose(multi_metrics[name], value, rel_tol=1e-4), name
  for exported in (
    "descriptors/descriptors.jsonl",
    "descriptors/descriptors.tsv",
    "cold_start/cold_descriptors.jsonl",
  ):
    assert (multi / exported).read_text() == (single / exported).read_text()


def test_to_host_reads_sharded_and_host_leaves_whole():
  mesh = jax.make_mesh((jax.device_count(),), ("rows",))
  rows = jax.device_put(
    jnp.arange(16.0).reshape(8, 2), NamedSharding(mesh, PartitionSpec("rows"))
  )
  host = parallel.to_host({"rows": rows, "b": [np.ones(2), 3]})
  assert isinstance(host["rows"], np.ndarray)
  np.testing.assert_array_equal(host["rows"], np.arange(16.0).reshape(8, 2))
  np.testing.assert_array_equal(host["b"][0], np.ones(2))
  assert host["b"][1] == 3
