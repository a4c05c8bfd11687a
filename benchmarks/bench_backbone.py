"""Pretrains a backbone on a real dataset and records quality and speed.

Trains to early stopping (or --max_epochs) in a fresh workdir, scores the
best epoch on the test split, times the full-rank test evaluation, and
appends one JSON object to benchmarks/results.jsonl. Render the table with
`python benchmarks/render_results.py`.

  python benchmarks/bench_backbone.py --config=configs/amazon.py \\
    --data_dir=/path/to/amazon --backbone=mf --max_epochs=3
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import tempfile
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

import configs
from face_jax import data, train
from face_jax.evaluation import prepare_ranking
from face_jax.training import pretrain, writer

import records

_HERE = pathlib.Path(__file__).resolve().parent

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  str(pathlib.Path(configs.__file__).parent / "amazon.py"),
  "Experiment config file; its --config.* fields can be overridden.",
  lock_config=True,
)
_DATA_DIR = flags.DEFINE_string(
  "data_dir", None, "RLMRec folder with trn_mat.pkl, val_mat.pkl, tst_mat.pkl."
)
_BACKBONE = flags.DEFINE_string(
  "backbone", None, "Backbone to train (default: the config's)."
)
_MAX_EPOCHS = flags.DEFINE_integer(
  "max_epochs", None, "Epoch cap (default: the config's, usually 3000)."
)
_EVAL_REPEATS = flags.DEFINE_integer(
  "eval_repeats", 5, "Timed full-rank test evaluations (after a warm-up)."
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Workdir of the run (default: a fresh temporary folder)."
)
_RESULTS = flags.DEFINE_string(
  "results", str(_HERE / "results.jsonl"), "JSONL file to append to."
)


def _time_test_eval(config, dataset, stage_dir, repeats):
  """Median seconds of a full test evaluation (embed + rank), warm."""
  backbone, graph, params = pretrain.restore_pretrained(
    config, dataset, stage_dir
  )
  score = pretrain.make_scorer(backbone, graph, tuple(config.eval.ks))
  task = prepare_ranking(dataset, "test", config.eval.batch_size)
  score(params, task)
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    score(params, task)
    seconds.append(time.perf_counter() - start)
  return float(np.median(seconds))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _DATA_DIR.value:
    raise app.UsageError("Give --data_dir, the RLMRec dataset folder.")
  writer.quiet_checkpoint_logs()
  config = _CONFIG.value
  if _BACKBONE.value:
    config.model.backbone = _BACKBONE.value
  if _MAX_EPOCHS.value:
    config.pretrain.max_epochs = _MAX_EPOCHS.value
  config.data.dir = _DATA_DIR.value
  config = train.resolve_config(config)
  dataset = data.load_dataset(config.data)
  workdir = pathlib.Path(
    _WORKDIR.value or tempfile.mkdtemp(prefix="bench_backbone_")
  )
  load_before = os.getloadavg()
  results = train.train_and_evaluate(
    config, workdir, dataset=dataset, stop_after=pretrain.STAGE
  )
  eval_seconds = _time_test_eval(
    config, dataset, workdir / pretrain.STAGE, _EVAL_REPEATS.value
  )
  result = results[pretrain.STAGE]
  record = {
    "dataset": config.data.name,
    "model": config.model.backbone,
    "stage": pretrain.STAGE,
    "split": "test",
    "metrics": result["test"],
    "valid_metrics": result["valid"],
    "epochs": result["epochs"],
    "best_epoch": result["best_epoch"],
    "max_epochs": config.pretrain.max_epochs,
    "early_stopped": result["epochs"] < config.pretrain.max_epochs,
    "seconds_per_epoch": result["seconds_per_epoch"],
    "eval_seconds": eval_seconds,
    "peak_rss_mb": records.peak_rss_mb(),
    "load_average": [round(value, 2) for value in load_before],
    "command": records.command(),
    "machine": records.machine(),
    "version": importlib.metadata.version("face_jax"),
    "date": records.utc_now(),
  }
  records.append(_RESULTS.value, [record])


if __name__ == "__main__":
  app.run(main)
