"""Cold-start quality: users and items ranked from their text alone.

Runs (or resumes) the whole job with `config.cold_start.enabled` in a
workdir and appends one row to benchmarks/results.jsonl per cold entity
type and method (FACE, the AlphaRec-style mapper, text similarity, random),
stage "cold_start", with Recall@K and NDCG@K on the cold entities (see
`face_jax.cold_start` for what is ranked), the number of ranking users and
candidates, the heads' epochs, the CPU shortcuts of the config, the
training stages' epochs and times, and the machine's load.

  python benchmarks/bench_cold_start.py --workdir=/tmp/cold_ml
  python benchmarks/bench_cold_start.py --config=configs/steam.py \\
    --workdir=/tmp/cold_steam --config.map.steps_per_epoch=10 ...

A workdir whose stages have finished is only read (the stages are
skipped), so the rows of a job run with `python -m face_jax.main
--config.cold_start.enabled=True --workdir=...` can be appended by
pointing this script at its workdir with the same config; such rows list
those stages in "finished_before", and their epoch times come from the
stages' own results ("stages"). Render the tables with
`python benchmarks/render_results.py`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time

from absl import app, flags
from ml_collections import config_flags

import configs
from face_jax import cold_start, data, train
from face_jax.training import checkpoints, writer

import records

_HERE = pathlib.Path(__file__).resolve().parent
_PROCESS_START = time.perf_counter()

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  str(pathlib.Path(configs.__file__).parent / "movielens.py"),
  "Experiment config file; its --config.* fields can be overridden. The "
  "cold start is switched on whatever the file says.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "The job's workdir; reusing one resumes it.", required=True
)
_RESULTS = flags.DEFINE_string(
  "results", str(_HERE / "results.jsonl"), "JSONL file to append to."
)

# Config fields that the CPU shortcuts of the configs change; every row
# records their values.
_SHORTCUT_FIELDS = (
  ("pretrain", "max_epochs"),
  ("map", "max_epochs"),
  ("map", "steps_per_epoch"),
  ("align", "max_epochs"),
  ("align", "batch_size"),
  ("align", "steps_per_epoch"),
  ("descriptors", "max_entities"),
)
_STAGE_FIELDS = ("epochs", "best_epoch", "seconds_per_epoch")


def _timed(stage: train.Stage, seconds: dict) -> train.Stage:
  def run(*args):
    start = time.perf_counter()
    result = stage.run(*args)
    seconds[stage.name] = round(time.perf_counter() - start, 1)
    return result

  return dataclasses.replace(stage, run=run)


def rows(config, results: dict, common: dict) -> list[dict]:
  """One row per cold entity type and method of a job's results."""
  cold = results[train.COLD_START]
  if "skipped" in cold:
    raise ValueError(f"The cold_start stage was skipped: {cold['skipped']}")
  section = config.cold_start
  stages = {
    name: {field: results[name].get(field) for field in _STAGE_FIELDS}
    for name in ("pretrain", "map", "align")
    if name in results and "skipped" not in results[name]
  }
  after = results[cold["after"]]
  records = []
  for kind in ("item", "user"):
    if kind not in cold:
      continue
    for method in cold_start.METHODS:
      head = cold["heads"][kind].get(method)
      records.append(
        {
          **common,
          "stage": train.COLD_START,
          "cold": kind,
          "method": method,
          "metrics": cold[kind][method],
          "queries": cold[kind]["queries"],
          "candidates": cold[kind]["candidates"],
          "pairs": cold[kind]["pairs"],
          "cold_users": cold["cold_users"],
          "cold_items": cold["cold_items"],
          "cold_cold_pairs": cold["cold_cold_pairs"],
          "item_share": section.item_share,
          "user_share": section.user_share,
          "split_seed": section.seed,
          "after": cold["after"],
          "warm_test_metrics": after["test"],
          "head": head,
          "distinct_descriptor_sets": (
            cold[kind].get("distinct_descriptor_sets")
            if method == "face"
            else None
          ),
          "stages": stages,
        }
      )
  return records


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  writer.quiet_checkpoint_logs()
  load_before = os.getloadavg()
  config = _CONFIG.value.copy_and_resolve_references()
  config.unlock()
  config.cold_start.enabled = True
  config = train.resolve_config(config)
  workdir = pathlib.Path(_WORKDIR.value).expanduser().absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  dataset = data.load_dataset(config.data)
  warm, stages = train.cold_start_setup(config, dataset, workdir)
  resumed = [
    stage.name
    for stage in stages
    if (workdir / stage.name / checkpoints.RESULT_FILE).exists()
  ]
  seconds = {}
  stages = [_timed(stage, seconds) for stage in stages]
  results = train.run_stages(config, warm, workdir, stages)
  common = {
    "dataset": config.data.name,
    "model": config.model.backbone,
    "llm": config.llm.model,
    "shortcuts": {
      f"{section}.{field}": config[section][field]
      for section, field in _SHORTCUT_FIELDS
    },
    # Stages finished before this process started (their times are in
    # "stages"), and the wall time of those this process ran.
    "finished_before": resumed,
    "stage_seconds": seconds,
    "process_seconds": round(time.perf_counter() - _PROCESS_START, 1),
    "peak_rss_mb": round(records.peak_rss_mb(), 1),
    "load_average": [round(value, 2) for value in load_before]
    + [round(os.getloadavg()[0], 2)],
    "workdir": str(workdir),
    "command": records.command(),
    "machine": records.machine(),
    "date": records.utc_now(),
  }
  records.append(_RESULTS.value, rows(config, results, common))


if __name__ == "__main__":
  app.run(main)
