"""The command line end to end on a tiny dataset.

`face_jax.data.load_dataset` is replaced by an in-process stand-in that
hands over a synthetic Dataset; with the RLMRec loader in place the same run
can read a tiny folder of pickles written to tmp_path instead.
"""

import json
import pathlib
import sys

import numpy as np
import pytest
from _face_fixtures import write_tiny_bert
from absl import flags
from absl import logging as absl_logging

import configs
import configs.tiny
import face_jax.data
from face_jax import main, train
from face_jax.data import Dataset
from face_jax.evaluation import prepare_ranking
from face_jax.training import pretrain as pretrain_stage

# The tiny config as a file, the way --config names one.
_TINY_CONFIG = pathlib.Path(configs.__file__).parent / "tiny.py"


def _synthetic_dataset(num_users=40, num_items=30, seed=0):
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


@pytest.fixture
def parsed_flags(monkeypatch):
  """Parses command-line flags for one test and forgets them after."""

  def parse(*arguments):
    argv = ["face_jax.main", *arguments]
    # config_flags reads the --config.* overrides from sys.argv.
    monkeypatch.setattr(sys, "argv", argv)
    flags.FLAGS(argv)

  level = absl_logging.get_absl_logger().level
  yield parse
  flags.FLAGS.unparse_flags()
  for name in list(flags.FLAGS):
    if name.startswith("config."):
      delattr(flags.FLAGS, name)
  # Unparsing resets --verbosity, which sets the absl logger to WARNING;
  # later tests that capture INFO logs need the level from before.
  absl_logging.get_absl_logger().setLevel(level)


def test_default_config_ships_with_the_package():
  assert main._DEFAULT_CONFIG.name == "movielens.py"
  assert main._DEFAULT_CONFIG.exists()


def test_main_trains_scores_and_skips_when_rerun(
  tmp_path, monkeypatch, parsed_flags
):
  loaded = []

  def load_dataset(data_config):
    loaded.append(data_config.name)
    return _synthetic_dataset()

  monkeypatch.setattr(face_jax.data, "load_dataset", load_dataset, False)
  workdir = tmp_path / "run"
  parsed_flags(
    f"--config={_TINY_CONFIG}",
    f"--workdir={workdir}",
    "--config.pretrain.max_epochs=2",
    "--config.model.backbone=mf",
    "--stop_after=pretrain",
  )
  main.main(["face_jax.main"])
  assert loaded == ["tiny"]

  saved_config = json.loads((workdir / "config.json").read_text())
  # The explicit flag wins over the per-backbone value (4 in tiny.py); the
  # unset L2 weight takes MF's.
  assert saved_config["pretrain"]["max_epochs"] == 2
  assert saved_config["model"]["reg_weight"] == 1e-6
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert list(metrics) == ["pretrain"]
  pretrain = metrics["pretrain"]
  assert pretrain["epochs"] == 2
  assert 1 <= pretrain["best_epoch"] <= 2
  for split in ("valid", "test"):
    assert set(pretrain[split]) == {
      f"{name}@{k}" for name in ("recall", "ndcg") for k in (5, 10, 20)
    }
    assert all(0.0 <= value <= 1.0 for value in pretrain[split].values())
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["epoch"] for line in lines[:2]] == [1, 2]
  assert "test" in json.loads(lines[-1])

  # The best epoch's checkpoint reproduces the reported test metrics.
  config = train.resolve_config(flags.FLAGS.config)
  dataset = _synthetic_dataset()
  backbone, graph, params = pretrain_stage.restore_pretrained(
    config, dataset, workdir / "pretrain"
  )
  score = pretrain_stage.make_scorer(backbone, graph, (5, 10, 20))
  rescored = score(params, prepare_ranking(dataset, "test", 8))
  for name, value in pretrain["test"].items():
    np.testing.assert_allclose(rescored[name], value, rtol=1e-6)

  checkpoints = sorted((workdir / "pretrain" / "checkpoints").iterdir())
  main.main(["face_jax.main"])
  assert json.loads((workdir / "metrics.json").read_text()) == metrics
  assert sorted((workdir / "pretrain" / "checkpoints").iterdir()) == (
    checkpoints
  )
  # The rerun logged no new epochs.
  assert (workdir / "metrics.jsonl").read_text().splitlines() == lines


def test_main_without_texts_ends_after_map_with_descriptors(
  tmp_path, monkeypatch, parsed_flags
):
  monkeypatch.setattr(
    face_jax.data, "load_dataset", lambda _: _synthetic_dataset(), False
  )
  workdir = tmp_path / "run"
  parsed_flags(
    f"--config={_TINY_CONFIG}",
    f"--workdir={workdir}",
    f"--config.llm.model={write_tiny_bert(tmp_path / 'bert')}",
    "--config.model.backbone=mf",
  )
  main.main(["face_jax.main"])
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert set(metrics) == set(train.STAGE_NAMES)
  assert "usr_prf.pkl" in metrics["align"]["skipped"]
  assert not (workdir / "align").exists()
  assert metrics["final"]["after"] == "map"
  assert set(metrics["final"]["stages"]) == {"pretrain", "map"}
  assert metrics["descriptors"]["after"] == "map"
  assert "retrieval" not in metrics["descriptors"]
  lines = (workdir / "descriptors" / "descriptors.jsonl").read_text()
  records = [json.loads(line) for line in lines.splitlines()]
  assert len(records) == 40 + 30
  assert all(record["text"] is None for record in records)
  assert all(len(record["words"]) == 4 for record in records)


@pytest.mark.parametrize("workdir", ["gs://bucket/face", "s3://b/run"])
def test_a_url_workdir_is_refused_before_anything_is_written(
  workdir, tmp_path, monkeypatch
):
  monkeypatch.chdir(tmp_path)
  config = configs.tiny.get_config()
  with pytest.raises(train.ConfigError, match=r"is a URL.*mount the bucket"):
    train.train_and_evaluate(config, workdir, dataset=_synthetic_dataset())
  assert list(tmp_path.iterdir()) == []


def test_main_reports_a_bad_data_folder_in_one_line(tmp_path, parsed_flags):
  workdir = tmp_path / "run"
  parsed_flags(
    f"--config={_TINY_CONFIG}",
    f"--workdir={workdir}",
    f"--config.data.dir={tmp_path / 'missing'}",
  )
  with pytest.raises(SystemExit) as raised:
    main.main(["face_jax.main"])
  message = str(raised.value.code)
  assert message.startswith("face_jax: DataError: ")
  assert f"{tmp_path / 'missing'} does not exist" in message
  assert "\n" not in message
  # Nothing is left behind for the next run to trip over.
  assert not workdir.exists()
