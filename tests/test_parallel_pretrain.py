"""The pretrain stage on device meshes: one step, padding, checkpoints."""

import functools
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys

import _step_parity
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import tiny
from face_jax import parallel, train
from face_jax.data import Dataset
from face_jax.models import backbones
from face_jax.training import (
  adam_coupled_l2,
  checkpoints,
  pretrain,
  sharded_train_state,
)
from face_jax.training.writer import MetricWriter

# 41 users and 30 items: no model axis of 2, 4 or 8 divides both, so the
# tables are padded on every mesh that splits them.
NUM_USERS, NUM_ITEMS = 41, 30


def _dataset(seed=0):
  """Random interactions split 3:1:1, in the Dataset form."""
  rng = np.random.default_rng(seed)
  pairs = np.array(
    [
      (user, item)
      for user in range(NUM_USERS)
      for item in rng.choice(NUM_ITEMS, rng.integers(5, 12), replace=False)
    ],
    dtype=np.int32,
  )
  pairs = pairs[rng.permutation(len(pairs))]
  cut = np.array([3, 4]) * len(pairs) // 5
  splits = [
    split[np.lexsort((split[:, 1], split[:, 0]))]
    for split in np.split(pairs, cut)
  ]
  return Dataset("tiny", NUM_USERS, NUM_ITEMS, *splits)


DATASET = _dataset()


def _config(backbone):
  config = tiny.get_config()
  config.model.backbone = backbone
  return train.resolve_config(config)


def _setup(config, mesh):
  """The pretrain stage's first step on `mesh`, with layout checks."""
  setup = pretrain.setup_pretraining(config, DATASET, mesh)
  model = mesh.shape["model"]
  params, opt_state = setup.state.params, setup.state.opt_state
  for name, rows in (("user", NUM_USERS), ("item", NUM_ITEMS)):
    table = params[name]
    # Rows padded to the shard count and split by rows; each device holds
    # its slice of the table and of both Adam moments.
    assert table.shape == (-(-rows // model) * model, 8)
    assert table.sharding.spec == P("model", None)
    assert {shard.data.shape[0] for shard in table.addressable_shards} == {
      table.shape[0] // model
    }
    assert opt_state[1].mu[name].sharding == table.sharding
    assert opt_state[1].nu[name].sharding == table.sharding
  assert setup.layout.batch["user"].spec == P("data")
  if setup.graph is not None:
    # CSR cannot be split: sharded tables propagate with segment sums.
    assert setup.graph.path == ("csr" if model == 1 else "segment_sum")
  batch = {name: values[0] for name, values in setup.make_batches(1).items()}
  return _step_parity.StepCase(
    setup.train_step, setup.state, batch, setup.graph, setup.rng
  )


@functools.cache
def _parity(backbone):
  config = _config(backbone)
  return _step_parity.assert_step_matches_single_device(
    functools.partial(_setup, config)
  )


@pytest.mark.parametrize("backbone", ["mf", "lightgcn"])
def test_pretrain_step_matches_single_device(backbone):
  results = _parity(backbone)
  assert sorted(results) == sorted([(1, 1), *_step_parity.MESH_SHAPES])
  reference = results[(1, 1)]
  assert int(reference.state.step) == 1
  assert np.isfinite(reference.metrics["loss"])


@pytest.mark.parametrize("backbone", ["simgcl", "lightgcl"])
def test_padded_tables_change_no_value(backbone):
  # The backbones whose terms run over all rows (InfoNCE denominators,
  # the SVD view) give the same losses and embeddings padded. (Padded rows
  # are sliced off before those terms, so no gradient reaches them.)
  config = _config(backbone).model
  plain, plain_graph = backbones.build(config, DATASET)
  padded, padded_graph = backbones.build(config, DATASET, (4, 8))
  batch = {
    "user": np.array([0, 40, 7, 40]),
    "pos": np.array([3, 29, 0, 5]),
    "neg": np.array([29, 1, 2, 0]),
  }

  @functools.partial(jax.jit, static_argnums=0)
  def run(backbone, graph):
    # Init inside the jitted function: one compile instead of many small.
    params = backbone.init(jax.random.key(3))
    terms, _ = backbone.losses(params, graph, batch, jax.random.key(4))
    return terms, backbone.embed(params, graph), params

  want = run(plain, plain_graph)
  got = run(padded, padded_graph)
  assert got[2]["user"].shape == (44, 8)
  assert got[2]["item"].shape == (32, 8)
  _step_parity.assert_trees_close(got, want, rtol=1e-5, atol=1e-7)
  users, items = got[1]
  assert users.shape == (NUM_USERS, 8) and items.shape == (NUM_ITEMS, 8)


def test_state_around_given_params_is_born_sharded():
  # A later stage's state: restored backbone tables passed in as they are,
  # fresh parameters drawn beside them; moments follow their parameters.
  mesh = _step_parity.make_mesh((2, 4))
  rules = _config("mf").mesh.rules
  table = parallel.place_global(
    np.arange(48.0).reshape(12, 4),
    parallel.named_sharding(mesh, rules, ("users", "embed"), (12, 4)),
  )

  def init(rng, user):
    return {"backbone": {"user": user}, "face": jax.random.normal(rng, (3,))}

  optimizer = adam_coupled_l2(0.1)
  axes = functools.partial(
    parallel.logical_axes_by_path,
    table=(("backbone/user", ("users", "embed")), (".*", None)),
  )
  state = sharded_train_state(
    init, optimizer, jax.random.key(0), mesh, rules, axes, table
  )
  user = state.params["backbone"]["user"]
  np.testing.assert_array_equal(user, np.arange(48.0).reshape(12, 4))
  assert user.sharding.spec == P("model", None)
  moment = state.opt_state[1].mu["backbone"]["user"]
  assert moment.sharding == user.sharding
  assert state.params["face"].sharding.spec == P()
  assert state.step.sharding.spec == P()


def test_propagation_follows_the_table_layout(caplog):
  assert pretrain.propagation_for("auto", (1, 1)) == "auto"
  assert pretrain.propagation_for("auto", (1, 4)) == "segment_sum"
  with caplog.at_level(logging.WARNING):
    assert pretrain.propagation_for("csr", (4, 4)) == "csr"
  assert "gathers both tables" in caplog.text


def _save(state, stage_dir):
  saved = checkpoints.EpochCheckpoints(stage_dir / "checkpoints", False)
  saved.save(1, state, {"epoch": 1}, improved=True)
  saved.close()
  checkpoints.write_json_atomic(
    stage_dir / checkpoints.RESULT_FILE, {"best_epoch": 1}
  )


def _restore(config, stage_dir, mesh):
  target = pretrain.state_target(config, DATASET, mesh)
  saved = checkpoints.EpochCheckpoints(stage_dir / "checkpoints")
  try:
    state, loop = saved.restore(1, target)
  finally:
    saved.close()
  assert loop == {"epoch": 1}
  return target, state


@pytest.mark.parametrize("backbone", ["mf", "lightgcn"])
def test_checkpoint_from_8_devices_restores_on_4_and_1(backbone, tmp_path):
  config = _config(backbone)
  # The state after one step on 8 devices: tables of 48 and 32 rows split
  # 8 ways, with their Adam moments.
  written = _parity(backbone)[(1, 8)].state
  assert written.params["user"].shape == (48, 8)
  _save(written, tmp_path)
  host = jax.device_get(written)
  for shape in [(2, 2), (1, 1)]:
    mesh = _step_parity.make_mesh(shape)
    target, state = _restore(config, tmp_path, mesh)
    for want, got in zip(
      jax.tree.leaves(target), jax.tree.leaves(state), strict=True
    ):
      assert got.shape == want.shape and got.sharding == want.sharding
    # Every value, real rows cropped or zero-filled, exactly as written.
    _step_parity.assert_trees_close(host, state, rtol=0, atol=0)
    _, _, params = pretrain.restore_pretrained(config, DATASET, tmp_path, mesh)
    _step_parity.assert_trees_close(host.params, params, rtol=0, atol=0)


def test_restored_run_resumes_alike_on_4_and_1(tmp_path):
  # Training goes on from the 8-device checkpoint, on 4 devices and on 1,
  # and the next step agrees.
  config = _config("lightgcn")
  results = _parity("lightgcn")
  _save(results[(1, 8)].state, tmp_path)
  steps = {}
  for shape in [(2, 2), (1, 1)]:
    mesh = _step_parity.make_mesh(shape)
    # The single-device step compiled for the parity check runs again.
    case = results[shape].case if shape in results else _setup(config, mesh)
    _, state = _restore(config, tmp_path, mesh)
    state, metrics = case.step(state, case.batch, case.graph, case.rng)
    assert int(state.step) == 2
    steps[shape] = jax.device_get((state, metrics))
  _step_parity.assert_trees_close(
    steps[(2, 2)], steps[(1, 1)], rtol=1e-5, atol=1e-6
  )


def test_checkpoint_rejects_other_widths(tmp_path):
  config = _config("mf")
  _save(_parity("mf")[(1, 8)].state, tmp_path)
  config.model.embed_dim = 4
  with pytest.raises(
    checkpoints.CheckpointError, match=r"shape \(\d+, 8\), the state expects"
  ):
    _restore(config, tmp_path, _step_parity.make_mesh((1, 1)))


def test_metric_writer_writes_on_process_0_only(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  writer = MetricWriter(tmp_path / "other", tensorboard=True)
  writer.write("pretrain", 1, {"train": {"loss": 1.0}})
  writer.close()
  assert not (tmp_path / "other").exists()
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  writer = MetricWriter(tmp_path / "main", tensorboard=False)
  writer.write("pretrain", 1, {"train": {"loss": 1.0}})
  assert writer.path.read_text().count("\n") == 1


# One process of a 2-process job with 2 CPU devices each: the pretrain
# stage's first step on two meshes, (2, 2) (the batch split across the
# processes) and (1, 4) (the tables split across them), each followed by a
# sharded checkpoint that both processes write and read back.
_WORKER = """
import json, pathlib, sys
import jax, numpy as np
sys.path.insert(0, "tests")
from configs import tiny
from face_jax import parallel, train
from face_jax.training import (
  adam_coupled_l2,
  checkpoints,
  pretrain,
  sharded_train_state,
)
import test_parallel_pretrain as shared

results = []
for shape in [(2, 2), (1, 4)]:
  config = tiny.get_config()
  config.model.backbone = "lightgcn"
  config.mesh.shape = shape
  config.mesh.distributed = True
  config.mesh.coordinator_address = sys.argv[1]
  config.mesh.num_processes = 2
  config.mesh.process_id = int(sys.argv[2])
  config = train.resolve_config(config)
  parallel.maybe_initialize(config.mesh)
  setup = pretrain.setup_pretraining(config, shared.DATASET)
  batch = {name: values[0] for name, values in setup.make_batches(1).items()}
  state, metrics = setup.train_step(setup.state, batch, setup.graph, setup.rng)
  folder = pathlib.Path(sys.argv[3]) / "x".join(map(str, shape))
  saved = checkpoints.EpochCheckpoints(folder, async_save=False)
  saved.save(1, state, {"epoch": 1}, improved=True)
  restored, _ = saved.restore(1, state)
  saved.close()
  before = state.params["user"].addressable_shards
  after = restored.params["user"].addressable_shards
  results.append({
    "loss": float(metrics["loss"]),
    "rows": restored.params["user"].shape[0],
    "local_rows": sorted({s.index[0].start for s in after}),
    "same": all(
      np.array_equal(a.data, b.data) for a, b in zip(before, after)
    ),
  })
print(json.dumps(results))
"""


@pytest.mark.slow
def test_two_processes_take_the_single_device_step(tmp_path):
  root = pathlib.Path(__file__).resolve().parents[1]
  env = {
    **os.environ,
    "PYTHONPATH": str(root),
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
  }
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    address = f"localhost:{sock.getsockname()[1]}"
  workers = [
    subprocess.Popen(
      [sys.executable, "-c", _WORKER, address, str(process), str(tmp_path)],
      cwd=root,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for process in (0, 1)
  ]
  outputs = []
  for worker in workers:
    stdout, stderr = worker.communicate(timeout=300)
    assert worker.returncode == 0, stderr[-3000:]
    outputs.append(json.loads(stdout.strip().splitlines()[-1]))
  reference = _parity("lightgcn")[(1, 1)]
  for process, results in enumerate(outputs):
    by_mesh = dict(zip(["2x2", "1x4"], results, strict=True))
    for result in results:
      np.testing.assert_allclose(
        result["loss"], reference.metrics["loss"], rtol=1e-5
      )
      assert result["same"]
    # (2, 2): each process holds both row halves of the 42-row table.
    assert by_mesh["2x2"]["rows"] == 42
    assert by_mesh["2x2"]["local_rows"] == [0, 21]
    # (1, 4): 44 rows in four 11-row shards, two on each process.
    assert by_mesh["1x4"]["rows"] == 44
    assert by_mesh["1x4"]["local_rows"] == [[0, 11], [22, 33]][process]
