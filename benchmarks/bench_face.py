"""Speed and quality of the FACE stages; one JSON line per run.

Two measures, each appending to benchmarks/results.jsonl (render the tables
with `python benchmarks/render_results.py`):

--measure=step: median wall time of the jitted map or align train step
  (after a compiling warm-up), its FLOPs as XLA counts them (see
  `useful_gflop`), the achieved FLOP/s beside this machine's float32 matmul
  peak (a large jnp.dot, measured in the same process), and the process's
  peak RSS. Run each step
  in its own process so that the RSS is that step's:

    python benchmarks/bench_face.py --measure=step --step=map \\
      --config=configs/amazon.py --config.data.dir=/path/to/amazon
    python benchmarks/bench_face.py --measure=step --step=align \\
      --config=configs/amazon.py --config.data.dir=/path/to/amazon

  The backbone and FACE parameters are freshly initialised (speed does not
  depend on their values); the step's key is the stage's, of the PRNG that
  config.face.rng_impl picks, as in the job. A dataset without texts gets
  random unit profile targets for the align step, which cost the same as
  real ones.
  --all_whole_words uses every whole-word token of the tokenizer as the
  codebook (21,745 for MiniLM) instead of the noun/adjective vocabulary.

--measure=job: the whole job (`face_jax.train`) in a workdir, timing each
  stage; one row per FACE stage (map, align) with the test and validation
  metrics of the backbone alone and after the stage, the descriptors'
  self-retrieval against random descriptors, epochs, seconds per epoch and
  step, the stage wall times and the job's wall time and peak RSS:

    python benchmarks/bench_face.py --measure=job   # MovieLens default
    python benchmarks/bench_face.py --measure=job --config=configs/steam.py

Timings on a shared machine vary; each row records the load average.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import configs
from face_jax import data, train
from face_jax.llm import vocab as vocab_lib
from face_jax.training import face_stages, writer
from face_jax.training.step import make_train_step

import records

_HERE = pathlib.Path(__file__).resolve().parent
_PROCESS_START = time.perf_counter()

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  str(pathlib.Path(configs.__file__).parent / "movielens.py"),
  "Experiment config file; its --config.* fields can be overridden.",
  lock_config=True,
)
_MEASURE = flags.DEFINE_enum(
  "measure", "job", ["step", "job"], "What to measure (see the docstring)."
)
_STEP = flags.DEFINE_enum(
  "step", "map", [face_stages.MAP, face_stages.ALIGN], "Step to time."
)
_RUNS = flags.DEFINE_integer("runs", 5, "Timed steps after the warm-up.")
_ALL_WHOLE_WORDS = flags.DEFINE_bool(
  "all_whole_words",
  False,
  "Step only: every whole-word token as the codebook, not the vocabulary.",
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Job only: the workdir (default: a fresh temporary one)."
)
_STOP_AFTER = flags.DEFINE_string(
  "stop_after", None, "Job only: last stage to run (default: all)."
)
_RESULTS = flags.DEFINE_string(
  "results", str(_HERE / "results.jsonl"), "JSONL file to append to."
)


def _common(config, load_before) -> dict:
  return {
    "dataset": config.data.name,
    "model": config.model.backbone,
    "llm": config.llm.model,
    "peak_rss_mb": round(records.peak_rss_mb(), 1),
    "load_average": [round(value, 2) for value in load_before]
    + [round(os.getloadavg()[0], 2)],
    "command": records.command(),
    "machine": records.machine(),
    "date": records.utc_now(),
  }


def matmul_peak_gflops(size: int = 4096, runs: int = 5) -> float:
  """Median float32 GFLOP/s of a [size, size] @ [size, size] product."""
  a = jnp.ones((size, size), jnp.float32)
  b = jnp.full((size, size), 0.5, jnp.float32)
  product = jax.jit(jnp.dot)
  product(a, b).block_until_ready()
  seconds = []
  for _ in range(runs):
    start = time.perf_counter()
    product(a, b).block_until_ready()
    seconds.append(time.perf_counter() - start)
  return 2 * size**3 / float(np.median(seconds)) / 1e9


def _whole_word_codebook(parts: face_stages.FaceParts):
  """The parts with every whole-word token of the tokenizer as codebook."""
  whole = vocab_lib.whole_word_tokens(parts.llm.tokenizer.get_vocab())
  ids = np.array(sorted(whole), np.int32)
  vocabulary = vocab_lib.Vocabulary(
    token_ids=ids,
    words=tuple(whole[i] for i in ids),
    whole_word_tokens=len(ids),
    list_size=0,
  )
  table = parts.llm.token_table(parts.llm.params)
  codebook = jnp.asarray(table[jnp.asarray(ids)], jnp.float32)
  return dataclasses.replace(parts, vocabulary=vocabulary, codebook=codebook)


def _step_constants(config, parts, dataset, stage, workdir):
  constants = {"graph": parts.graph, "codebook": parts.codebook}
  if stage == face_stages.MAP:
    return constants
  if dataset.has_text:
    return face_stages.align_constants(config, parts, dataset, workdir)
  rng = np.random.default_rng(0)
  hidden = parts.llm.info.hidden_size
  for name, count in (
    ("user_profiles", dataset.num_users),
    ("item_profiles", dataset.num_items),
  ):
    rows = rng.normal(size=(count, hidden)).astype(np.float32)
    constants[name] = jnp.asarray(
      rows / np.linalg.norm(rows, axis=1, keepdims=True)
    )
  constants["llm"] = parts.llm.params
  constants["layout"] = face_stages.sentence_layout(
    parts.llm, config.data.item_noun, config.face.num_words
  )
  return constants


def useful_gflop(config, parts, stage, arguments) -> float:
  """GFLOP of one step's math, as XLA counts the compiled program.

  XLA counts the body of a loop once, so the count is taken on a variant
  without loops: the whole codebook searched in one chunk and the LLM
  called on all sentences at once (no rematerialisation, whose extra
  forward pass is not counted as useful work). The optimised program is
  counted: before optimisation the sparse graph products count as more.
  """
  flat = copy.deepcopy(config)
  flat.face.chunk_size = len(parts.vocabulary)
  flat.align.llm_chunk = 0
  flat_parts = dataclasses.replace(
    parts,
    model=face_stages.build_face_model(flat, parts.llm.info.hidden_size),
  )
  step = make_train_step(
    face_stages.make_face_loss(flat, flat_parts, align=stage == "align"),
    face_stages.face_optimizer(flat),
  )
  costs = step.lower(*arguments).compile().cost_analysis()
  costs = costs[0] if isinstance(costs, list | tuple) else costs
  return float(costs["flops"]) / 1e9


def measure_step(config, dataset, load_before) -> dict:
  """Times `_STEP`'s jitted train step; returns the record."""
  stage = _STEP.value
  peak = matmul_peak_gflops()
  parts = face_stages.load_face_parts(config, dataset)
  if _ALL_WHOLE_WORDS.value:
    parts = _whole_word_codebook(parts)
  workdir = pathlib.Path(_WORKDIR.value or tempfile.mkdtemp(prefix="face_"))
  constants = _step_constants(config, parts, dataset, stage, workdir)
  state = face_stages.initial_map_state(
    config, parts, parts.backbone.init(jax.random.key(0))
  )
  step = make_train_step(
    face_stages.make_face_loss(config, parts, align=stage == "align"),
    face_stages.face_optimizer(config),
  )
  batches = face_stages.make_stage_batches(
    config, config[stage], dataset, stage
  )(1)
  steps = len(batches["user"])
  # The stage's own key, so dropout and edge drop use the PRNG the job uses
  # (config.face.rng_impl: Philox on one device draws them several times
  # faster on CPU than jax.random.key's default threefry).
  rng = face_stages.stage_rng(config, stage)
  first = {name: values[0] for name, values in batches.items()}
  gflop = useful_gflop(config, parts, stage, (state, first, constants, rng))
  start = time.perf_counter()
  step.lower(state, first, constants, rng).compile()
  compile_seconds = time.perf_counter() - start
  seconds = []
  for run in range(_RUNS.value + 1):
    batch = {name: values[run % steps] for name, values in batches.items()}
    start = time.perf_counter()
    state, metrics = step(state, batch, constants, rng)
    jax.block_until_ready(metrics)
    seconds.append(time.perf_counter() - start)
  median = float(np.median(seconds[1:]))
  return {
    **_common(config, load_before),
    "stage": "face_step",
    "step": stage,
    "batch_size": config[stage].batch_size,
    "entities_per_step": 3 * config[stage].batch_size,
    "num_words": config.face.num_words,
    "word_dim": config.face.word_dim,
    "vocabulary_size": len(parts.vocabulary),
    "step_seconds": round(median, 4),
    "step_seconds_runs": [round(s, 4) for s in seconds[1:]],
    "compile_seconds": round(compile_seconds, 2),
    "llm_chunk": config.align.llm_chunk if stage == "align" else None,
    "rng_impl": str(jax.random.key_impl(rng)),
    "quantizer_chunk": config.face.chunk_size,
    "gflop": round(gflop, 1),
    "achieved_gflops": round(gflop / median, 1),
    "matmul_peak_gflops": round(peak, 1),
    "loss_terms": {k: round(float(v), 5) for k, v in metrics.items()},
    "synthetic_profiles": stage == "align" and not dataset.has_text,
  }


def _timed(stage: train.Stage, seconds: dict) -> train.Stage:
  def run(*args):
    start = time.perf_counter()
    result = stage.run(*args)
    seconds[stage.name] = round(time.perf_counter() - start, 1)
    return result

  return dataclasses.replace(stage, run=run)


def measure_job(config, dataset, load_before) -> list[dict]:
  """Runs the job; returns one record per FACE stage that ran."""
  workdir = pathlib.Path(_WORKDIR.value or tempfile.mkdtemp(prefix="face_"))
  stage_seconds = {}
  stages = [
    _timed(stage, stage_seconds)
    for stage in train.stages_until(_STOP_AFTER.value)
  ]
  workdir.mkdir(parents=True, exist_ok=True)
  results = train.run_stages(config, dataset, workdir, stages)
  wall = time.perf_counter() - _PROCESS_START
  backbone = results["pretrain"]
  retrieval = results.get("descriptors", {}).get("retrieval", {})
  records = []
  for stage in (face_stages.MAP, face_stages.ALIGN):
    result = results.get(stage)
    if not result or "skipped" in result:
      continue
    section = config[stage]
    records.append(
      {
        **_common(config, load_before),
        "stage": stage,
        "split": "test",
        "metrics": result["test"],
        "valid_metrics": result["valid"],
        "backbone_metrics": backbone["test"],
        "backbone_valid_metrics": backbone["valid"],
        "retrieval": retrieval.get(stage),
        "shuffled_retrieval": retrieval.get("shuffled"),
        "epochs": result["epochs"],
        "best_epoch": result["best_epoch"],
        "max_epochs": section.max_epochs,
        "early_stopped": result["epochs"] < section.max_epochs,
        "batch_size": section.batch_size,
        "steps_per_epoch": result["steps_per_epoch"],
        "seconds_per_epoch": round(result["seconds_per_epoch"], 2),
        "step_seconds": round(result["seconds_per_step"], 4),
        "backbone_epochs": backbone["epochs"],
        "stage_seconds": stage_seconds,
        "wall_seconds": round(wall, 1),
        "distinct_tokens": results.get("descriptors", {}).get(
          "distinct_tokens"
        ),
        "vocabulary_size": result["vocabulary_size"],
        "workdir": str(workdir),
      }
    )
  return records


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  writer.quiet_checkpoint_logs()
  load_before = os.getloadavg()
  config = train.resolve_config(_CONFIG.value)
  dataset = data.load_dataset(config.data)
  if _MEASURE.value == "step":
    records.append(_RESULTS.value, [measure_step(config, dataset, load_before)])
  else:
    for record in measure_job(config, dataset, load_before):
      records.append(_RESULTS.value, [record])


if __name__ == "__main__":
  app.run(main)
