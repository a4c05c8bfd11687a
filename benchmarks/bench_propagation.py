"""Times graph propagation on the real Amazon-book train graph.

Measures, for each kernel and for the alternatives weighed against it:
  layer_forward: one layer A x over all users and items.
  fwd_bwd_3_layers_dropout: LightGCN's training computation (3 layers,
    edge dropout with keep rate 0.8, BPR on a batch) and its gradient with
    respect to both tables.
  train_step: the same plus Adam with coupled L2 on the tables.
  adam_update: Adam alone, to separate it from propagation.
Each line appended to benchmarks/results.jsonl holds the median of `--runs`
timed calls after one compile call, with the load average before and after
(the machine may be shared).

From the repository root:
  python -m benchmarks.bench_propagation --data_dir=DIR [--runs=15]

DIR holds RLMRec's trn_mat.pkl (a pickled scipy coo_matrix).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
import pickle
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.sparse
from absl import app, flags

from configs import base
from face_jax import graph as graph_lib
from face_jax.data import Dataset
from face_jax.models import backbones

RESULTS = pathlib.Path(__file__).resolve().parent / "results.jsonl"
MEASURES = (
  "layer_forward",
  "fwd_bwd_3_layers_dropout",
  "train_step",
  "adam_update",
)

_DATA_DIR = flags.DEFINE_string(
  "data_dir", None, "RLMRec dataset folder with trn_mat.pkl.", required=True
)
_RUNS = flags.DEFINE_integer("runs", 15, "Timed calls per case.")
_DIM = flags.DEFINE_integer("dim", 256, "Embedding size.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "BPR triples per step.")
_MEASURES = flags.DEFINE_list("measures", list(MEASURES), "What to time.")
_RESULTS = flags.DEFINE_string(
  "results", str(RESULTS), "JSON-lines file the results are appended to."
)

# The only globals an RLMRec matrix pickle may name (numpy 1.x spelling
# included); anything else is refused.
_ALLOWED_GLOBALS = {
  ("numpy.core.multiarray", "_reconstruct"),
  ("numpy._core.multiarray", "_reconstruct"),
  ("numpy", "ndarray"),
  ("numpy", "dtype"),
  ("scipy.sparse._coo", "coo_matrix"),
  ("scipy.sparse.coo", "coo_matrix"),
}


class _MatrixUnpickler(pickle.Unpickler):
  def find_class(self, module, name):
    if (module, name) not in _ALLOWED_GLOBALS:
      raise pickle.UnpicklingError(
        f"{module}.{name} is not allowed in a matrix pickle."
      )
    module = module.replace("numpy.core.", "numpy._core.")
    if module == "scipy.sparse.coo":
      module = "scipy.sparse._coo"
    return super().find_class(module, name)


def load_train(data_dir: pathlib.Path) -> Dataset:
  """The train split of an RLMRec folder, read through the restricted loader."""
  with open(data_dir / "trn_mat.pkl", "rb") as file:
    matrix = _MatrixUnpickler(file).load()
  if not isinstance(matrix, scipy.sparse.coo_matrix):
    raise TypeError(f"trn_mat.pkl holds {type(matrix)}, not a coo_matrix.")
  num_users, num_items = matrix.shape
  nonzero = np.asarray(matrix.data) != 0
  pairs = np.stack([matrix.row[nonzero], matrix.col[nonzero]], axis=1)
  pairs = np.unique(pairs.astype(np.int32), axis=0)
  empty = np.zeros((0, 2), np.int32)
  return Dataset(data_dir.name, num_users, num_items, pairs, empty, empty)


def time_call(fn, args, runs):
  """Wall seconds (median, minimum) and median CPU seconds of `runs` calls.

  One untimed call compiles first. CPU seconds (all threads of this process)
  are less sensitive than wall time to other processes on a shared machine.
  """
  jax.block_until_ready(fn(*args))
  wall, cpu = [], []
  for _ in range(runs):
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return statistics.median(wall), min(wall), statistics.median(cpu)


def time_steps(step, state_and_batches, runs):
  """Like `time_call` for a step that consumes and returns its state."""
  state, batches = state_and_batches
  state = jax.block_until_ready(step(*state, batches[0]))[:2]
  wall, cpu = [], []
  for i in range(runs):
    batch = batches[1 + i % (len(batches) - 1)]
    start, start_cpu = time.perf_counter(), time.process_time()
    state = jax.block_until_ready(step(*state, batch))[:2]
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return statistics.median(wall), min(wall), statistics.median(cpu)


def square_blocks(dataset):
  """The whole (U+I) x (U+I) matrix as one CSR, for the single-matrix option."""
  block = graph_lib.normalized_matrix(
    dataset.train, dataset.num_users, dataset.num_items
  )
  full = scipy.sparse.bmat([[None, block], [block.T, None]]).tocsr()
  full.sort_indices()
  rows = np.repeat(np.arange(full.shape[0]), np.diff(full.indptr))
  return graph_lib.Block(
    indptr=jnp.asarray(full.indptr, jnp.int32),
    indices=jnp.asarray(full.indices, jnp.int32),
    rows=jnp.asarray(rows, jnp.int32),
    values=jnp.asarray(full.data, jnp.float32),
    max_degree=int(np.diff(full.indptr).max()),
  )


def layer_forward_cases(dataset, graphs, tables):
  """One layer over all rows: the operator's paths and the alternatives."""
  cases = {}
  for path, graph in graphs.items():
    op = graph_lib.full_operator(graph)
    cases[path] = (jax.jit(graph_lib.propagate), (op, *tables))
  square = square_blocks(dataset)

  def square_layer(block, users, items, path):
    stacked = jnp.concatenate([users, items])
    out = graph_lib.spmm(block, stacked, path)
    return out[: users.shape[0]], out[users.shape[0] :]

  for path in graph_lib.PATHS:
    fn = jax.jit(functools.partial(square_layer, path=path))
    cases[f"{path}_square"] = (fn, (square, *tables))

  def unsorted_layer(op, users, items):
    def product(block, x):
      messages = block.values[:, None] * x[block.indices]
      return jax.ops.segment_sum(
        messages, block.rows, num_segments=block.indptr.shape[0] - 1
      )

    return product(op.user_rows, items), product(op.item_rows, users)

  op = graph_lib.full_operator(graphs["segment_sum"])
  cases["segment_sum_unsorted"] = (jax.jit(unsorted_layer), (op, *tables))
  return cases


def batches_for(dataset, count, size, seed=0):
  rng = np.random.default_rng(seed)
  picks = rng.integers(0, len(dataset.train), size=(count, size))
  return [
    {
      "user": jnp.asarray(dataset.train[pick, 0]),
      "pos": jnp.asarray(dataset.train[pick, 1]),
      "neg": jnp.asarray(rng.integers(0, dataset.num_items, size), jnp.int32),
    }
    for pick in picks
  ]


def gradient_cases(dataset, graphs, params, batch, config):
  """LightGCN's loss and gradient with edge dropout, per option."""
  cases = {}
  for path, graph in graphs.items():
    backbone, _ = backbones.build(_with(config, propagation=path), dataset)

    def loss(params, graph, batch, rng, backbone=backbone):
      terms, _ = backbone.losses(params, graph, batch, rng)
      return sum(terms.values())

    fn = jax.jit(jax.value_and_grad(loss))
    cases[path] = (fn, (params, graph, batch, jax.random.key(0)))

  def zeroed_loss(params, graph, batch, rng):
    # Dropped entries kept as zeros: the kernel still visits them.
    zeroing = graph.replace(path="segment_sum")
    op = graph_lib.dropped_operator(zeroing, rng, config.keep_rate)
    op = op.replace(path="csr")
    return _dropout_bpr(op, params, batch, config.num_layers, only_rows=True)

  def full_tables_loss(params, graph, batch, rng):
    # Layer sums of whole tables, differentiated by JAX through `propagate`.
    op = graph_lib.dropped_operator(graph, rng, config.keep_rate)
    return _dropout_bpr(op, params, batch, config.num_layers, only_rows=False)

  arguments = (params, graphs["csr"], batch, jax.random.key(0))
  cases["csr_zeroed"] = (jax.jit(jax.value_and_grad(zeroed_loss)), arguments)
  cases["csr_full_tables"] = (
    jax.jit(jax.value_and_grad(full_tables_loss)),
    arguments,
  )
  return cases


def _dropout_bpr(op, params, batch, num_layers, only_rows):
  items = jnp.concatenate([batch["pos"], batch["neg"]])
  if only_rows:
    users, items = graph_lib.layer_sum_rows(
      op, params["user"], params["item"], num_layers, batch["user"], items
    )
  else:
    all_users, all_items = graph_lib.layer_sum(
      op, params["user"], params["item"], num_layers
    )
    users, items = all_users[batch["user"]], all_items[items]
  return backbones.bpr_loss(users, *jnp.split(items, 2))


def _with(config, **overrides):
  config = config.copy_and_resolve_references()
  for name, value in overrides.items():
    setattr(config, name, value)
  return config


def _optimizer(config):
  """Adam with coupled L2, as the authors' torch Adam(weight_decay)."""
  return optax.chain(
    optax.add_decayed_weights(2 * config.reg_weight), optax.adam(1e-3)
  )


def train_step_cases(dataset, graphs, config):
  """A full LightGCN step: losses, gradient, Adam with coupled L2."""
  optimizer = _optimizer(config)
  cases = {}
  for path, graph in graphs.items():
    backbone, _ = backbones.build(_with(config, propagation=path), dataset)

    def step(params, opt_state, graph, batch, rng, backbone=backbone):
      def loss(params):
        terms, _ = backbone.losses(params, graph, batch, rng)
        return sum(terms.values())

      value, grads = jax.value_and_grad(loss)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, value

    cases[path] = (backbone, graph, jax.jit(step, donate_argnums=(0, 1)))
  return optimizer, cases


def main(argv):
  del argv
  runs = _RUNS.value
  dataset = load_train(pathlib.Path(_DATA_DIR.value))
  config = base.get_base_config().model
  config.backbone, config.embed_dim = "lightgcn", _DIM.value
  graphs = {
    path: graph_lib.build_graph(
      dataset.train, dataset.num_users, dataset.num_items, path
    )
    for path in graph_lib.PATHS
  }
  params = backbones.xavier_tables(
    jax.random.key(0), dataset.num_users, dataset.num_items, _DIM.value
  )
  batches = batches_for(dataset, 8, _BATCH_SIZE.value)
  record = functools.partial(_record, runs=runs, dataset=dataset)

  if "layer_forward" in _MEASURES.value:
    tables = (params["user"], params["item"])
    cases = layer_forward_cases(dataset, graphs, tables)
    for name, (fn, fn_args) in cases.items():
      record("layer_forward", name, *_timed(time_call, fn, fn_args, runs))

  if "fwd_bwd_3_layers_dropout" in _MEASURES.value:
    cases = gradient_cases(dataset, graphs, params, batches[0], config)
    for name, (fn, fn_args) in cases.items():
      timing = _timed(time_call, fn, fn_args, runs)
      record("fwd_bwd_3_layers_dropout", name, *timing)

  if "train_step" in _MEASURES.value:
    optimizer, cases = train_step_cases(dataset, graphs, config)
    for name, (backbone, graph, step) in cases.items():
      fresh = backbone.init(jax.random.key(0))

      def run(params, opt_state, batch, graph=graph, step=step):
        return step(params, opt_state, graph, batch, jax.random.key(1))

      state = (fresh, optimizer.init(fresh))
      timing = _timed(time_steps, run, (state, batches), runs)
      record("train_step", name, *timing)

  if "adam_update" in _MEASURES.value:
    optimizer = _optimizer(config)

    def update(params, opt_state, grads):
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    grads = jax.tree.map(jnp.ones_like, params)
    fn_args = (params, optimizer.init(params), grads)
    timing = _timed(time_call, jax.jit(update), fn_args, runs)
    record("adam_update", "none", *timing)


def _timed(timer, fn, fn_args, runs):
  load_before = os.getloadavg()[0]
  median, best, cpu = timer(fn, fn_args, runs)
  return median, best, cpu, load_before, os.getloadavg()[0]


def _machine():
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as file:
      for line in file:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  device = jax.devices()[0]
  return (
    f"{model}, {os.cpu_count()} cpus, jax {jax.__version__} "
    f"{device.platform}:{device.device_kind}"
  )


def _record(
  measure, path, median, best, cpu, load_before, load_after, *, runs, dataset
):
  line = {
    "dataset": dataset.name,
    "stage": "propagation",
    "measure": measure,
    "path": path,
    "seconds": round(median, 5),
    "min_seconds": round(best, 5),
    "cpu_seconds": round(cpu, 5),
    "runs": runs,
    "dim": _DIM.value,
    "batch_size": _BATCH_SIZE.value,
    "num_users": dataset.num_users,
    "num_items": dataset.num_items,
    "num_pairs": len(dataset.train),
    "load_average": [round(load_before, 2), round(load_after, 2)],
    "command": " ".join(
      ["python -m benchmarks.bench_propagation", *sys.argv[1:]]
    ),
    "machine": _machine(),
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds"
    ),
  }
  print(json.dumps(line), flush=True)
  with open(_RESULTS.value, "a") as file:
    file.write(json.dumps(line) + "\n")


if __name__ == "__main__":
  app.run(main)
