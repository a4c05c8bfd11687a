"""The train step and the epoch loop: compile once, stop, resume, NaN."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from face_jax import train
from face_jax.data import Dataset
from face_jax.evaluation import prepare_ranking
from face_jax.training import (
  FitOptions,
  MetricWriter,
  NonFiniteLossError,
  TrainState,
  adam_coupled_l2,
  fit,
  make_train_step,
)
from face_jax.training.pretrain import setup_pretraining


def _synthetic_dataset(num_users=40, num_items=30, seed=0):
  """Random interactions split 3:1:1, in the Dataset form."""
  rng = np.random.default_rng(seed)
  pairs = np.array(
    [
      (user, item)
      for user in range(num_users)
      for item in rng.choice(num_items, rng.integers(5, 12), replace=False)
    ],
    dtype=np.int32,
  )
  pairs = pairs[rng.permutation(len(pairs))]
  cut = np.array([3, 4]) * len(pairs) // 5
  splits = [
    split[np.lexsort((split[:, 1], split[:, 0]))]
    for split in np.split(pairs, cut)
  ]
  return Dataset("tiny", num_users, num_items, *splits)


def _quadratic_setup(num_steps=4):
  """A one-table model whose loss is a quadratic; 4 steps per epoch."""
  optimizer = adam_coupled_l2(0.1, 0.01)

  def loss_fn(params, graph, batch, rng):
    del graph, rng
    target = batch["target"][:, None]
    return {"fit": jnp.mean((params["w"] - target) ** 2)}

  def make_batches(epoch):
    targets = np.arange(num_steps * 2, dtype=np.float32) + epoch
    return {"target": targets.reshape(num_steps, 2)}

  state = TrainState.create({"w": jnp.zeros((3,), jnp.float32)}, optimizer)
  return state, make_train_step(loss_fn, optimizer), make_batches


def _options(**overrides):
  values = dict(max_epochs=20, patience=3, log_every=3, progress_bar=False)
  values.update(overrides)
  return FitOptions(**values)


def test_train_step_compiles_once_and_early_stopping_restores_best(tmp_path):
  state, train_step, make_batches = _quadratic_setup()
  # The best epoch is the 5th; three epochs without progress follow.
  script = iter([0.1, 0.2, 0.2, 0.15, 0.3, 0.1, 0.3, 0.05, 0.9])
  seen_params = {}

  def evaluate(params):
    seen_params[len(seen_params) + 1] = np.asarray(params["w"]).copy()
    return {"recall@20": next(script)}

  writer = MetricWriter(tmp_path, tensorboard=False)
  result = fit(
    stage="quadratic",
    state=state,
    train_step=train_step,
    make_batches=make_batches,
    evaluate=evaluate,
    graph=None,
    rng=jax.random.key(0),
    checkpoint_dir=tmp_path / "checkpoints",
    writer=writer,
    # Synchronous saves here; the other runs write in the background.
    options=_options(async_save=False),
  )
  assert result.loop.epoch == 8
  assert result.loop.best_epoch == 5
  assert result.loop.best_metrics == {"recall@20": 0.3}
  assert int(result.state.step) == 5 * 4
  np.testing.assert_array_equal(result.state.params["w"], seen_params[5])
  assert train_step._cache_size() == 1
  lines = [json.loads(line) for line in writer.path.read_text().splitlines()]
  assert [line["epoch"] for line in lines] == list(range(1, 9))
  improved = [line["improved"] for line in lines]
  assert improved == [True, True, False, False, True, False, False, False]


def test_reported_stats_reach_the_metrics_but_not_the_loss():
  optimizer = adam_coupled_l2(0.1, 0.01)
  batch = {"target": np.array([1.0, 3.0], np.float32)}
  params = {"w": jnp.array([0.5, -1.0, 2.0], jnp.float32)}

  def terms(params, batch):
    return {"fit": jnp.mean((params["w"] - batch["target"][:, None]) ** 2)}

  def with_stats(params, graph, batch, rng):
    del graph, rng
    # A stat that depends on the params: it must get no gradient.
    return terms(params, batch), {"w_sum": 1e3 * jnp.sum(params["w"])}

  def without_stats(params, graph, batch, rng):
    del graph, rng
    return terms(params, batch)

  results = []
  for loss_fn in (with_stats, without_stats):
    step = make_train_step(loss_fn, optimizer)
    state = TrainState.create(jax.tree.map(jnp.copy, params), optimizer)
    results.append(step(state, batch, None, jax.random.key(0)))
  (stat_state, stat_metrics), (plain_state, plain_metrics) = results
  assert float(stat_metrics["w_sum"]) == pytest.approx(1500.0)
  # w = (0.5, -1, 2) against targets (1, 3): mean of the six squares.
  expected = np.mean((np.array([0.5, -1.0, 2.0]) - [[1.0], [3.0]]) ** 2)
  assert float(stat_metrics["loss"]) == pytest.approx(expected)
  assert set(plain_metrics) == {"loss", "fit", "grad_norm"}
  assert stat_metrics["grad_norm"] == plain_metrics["grad_norm"]
  np.testing.assert_array_equal(stat_state.params["w"], plain_state.params["w"])


def test_nan_loss_stops_with_the_step(tmp_path):
  state, train_step, make_batches = _quadratic_setup()

  def poisoned(epoch):
    batches = make_batches(epoch)
    if epoch == 2:
      batches["target"][1, 0] = np.nan
    return batches

  with pytest.raises(NonFiniteLossError, match=r"nan at step 5 \(epoch 2\)"):
    fit(
      stage="quadratic",
      state=state,
      train_step=train_step,
      make_batches=poisoned,
      evaluate=lambda params: {"recall@20": 0.0},
      graph=None,
      rng=jax.random.key(0),
      checkpoint_dir=tmp_path / "checkpoints",
      writer=MetricWriter(tmp_path, tensorboard=False),
      options=_options(),
    )


class _StopError(Exception):
  """Stands for a run killed between epochs."""


def _fit_pretrain(config, dataset, directory, on_epoch_end=None):
  setup = setup_pretraining(config, dataset)
  valid = prepare_ranking(dataset, "valid", config.eval.batch_size)
  result = fit(
    stage="pretrain",
    state=setup.state,
    train_step=setup.train_step,
    make_batches=setup.make_batches,
    evaluate=lambda params: setup.score(params, valid),
    graph=setup.graph,
    rng=setup.rng,
    checkpoint_dir=directory / "checkpoints",
    writer=MetricWriter(directory, tensorboard=False),
    options=_options(max_epochs=6, patience=2),
    on_epoch_end=on_epoch_end,
  )
  return result, setup.train_step


def test_interrupted_run_resumes_where_it_stopped(tmp_path):
  config = train.resolve_config(tiny.get_config())
  config.pretrain.learning_rate = 0.05
  dataset = _synthetic_dataset()
  whole, _ = _fit_pretrain(config, dataset, tmp_path / "whole")
  # Stopping after epoch 4 lands between the best epoch and the early stop,
  # so a resume that lost the best epoch or the patience count would differ.
  assert whole.loop.best_epoch < 4 < whole.loop.epoch < 6

  def stop_after_four(loop):
    if loop.epoch == 4:
      raise _StopError

  with pytest.raises(_StopError):
    _fit_pretrain(config, dataset, tmp_path / "split", stop_after_four)
  epochs_run = []
  resumed, train_step = _fit_pretrain(
    config,
    dataset,
    tmp_path / "split",
    lambda loop: epochs_run.append(loop.epoch),
  )
  assert epochs_run == list(range(5, whole.loop.epoch + 1))
  assert resumed.loop.best_epoch == whole.loop.best_epoch
  assert resumed.loop.best_metrics == whole.loop.best_metrics
  assert resumed.loop.bad_epochs == whole.loop.bad_epochs
  for name in ("user", "item"):
    np.testing.assert_allclose(
      resumed.state.params[name], whole.state.params[name], rtol=1e-6
    )
  # The step is compiled ahead of time for a fresh state's layout and
  # refuses any other, so the resumed epochs ran on restored arrays laid
  # out like a fresh state.
  assert isinstance(train_step.compiled, jax.stages.Compiled)
  # A run that had already stopped only restores its best epoch.
  epochs_run.clear()
  again, _ = _fit_pretrain(
    config,
    dataset,
    tmp_path / "split",
    lambda loop: epochs_run.append(loop.epoch),
  )
  assert epochs_run == []
  assert again.loop == resumed.loop
  np.testing.assert_array_equal(
    again.state.params["user"], resumed.state.params["user"]
  )


def test_finished_stage_is_skipped(tmp_path):
  calls = []

  def run(config, dataset, stage_dir, writer):
    calls.append(stage_dir.name)
    return {"value": len(calls)}

  stages = (train.Stage("first", run), train.Stage("second", run))
  config = train.resolve_config(tiny.get_config())
  first = train.run_stages(config, None, tmp_path, stages)
  assert first == {"first": {"value": 1}, "second": {"value": 2}}
  (tmp_path / "second" / "result.json").unlink()
  again = train.run_stages(config, None, tmp_path, stages)
  assert calls == ["first", "second", "second"]
  assert again == {"first": {"value": 1}, "second": {"value": 3}}
  saved = json.loads((tmp_path / "metrics.json").read_text())
  assert saved == again
