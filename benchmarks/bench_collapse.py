"""Descriptor collapse in the map stage: face_jax beside the authors' module.

Both implementations train the map-stage terms of their FACE module
(vq_weight * VQ + recon_weight * reconstruction, Adam at
config.face.learning_rate, dropout on) on the same inputs: the final CF
embeddings of a finished pretrain stage, held fixed (the backbone's own
loss does not reach the FACE parameters), the codebook's frozen LLM token
rows, and the same batches of users, positive and negative items (whole
map epochs as the job draws them). Before training and after each epoch
every user and item is described (dropout off); a row per implementation
goes to benchmarks/results.jsonl (stage "collapse"): distinct tokens and
distinct descriptor sets among all entities, and the mean number of
distinct tokens per training batch in each epoch (W means every entity of
the batch got the same words).

  python -m face_jax.main --workdir=workdirs/movielens --stop_after=pretrain
  python benchmarks/bench_collapse.py --workdir=workdirs/movielens \\
    --reference_face_py=/path/to/FACE/encoder/FACE.py \\
    --reference_python=/path/to/venv-with-torch/bin/python

--reference_face_py is the authors' encoder/FACE.py (github.com/YixinRoll/
FACE), run unchanged by benchmarks/reference_face_map.py under
--reference_python, which needs torch and pandas (face_jax needs neither);
without it only face_jax's row is written. Their module's projection init
is theirs whatever config.face.projection_init says, so compare against a
config that keeps the default "flat".
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

import configs
from face_jax import data, descriptors, train
from face_jax.evaluation import descriptor_quality
from face_jax.training import checkpoints, face_stages, optimizers, pretrain

import records

_HERE = pathlib.Path(__file__).resolve().parent

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  str(pathlib.Path(configs.__file__).parent / "movielens.py"),
  "Experiment config file; its --config.* fields can be overridden.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Workdir of a job whose pretrain stage has finished."
)
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Map epochs to train.")
_STEPS_PER_EPOCH = flags.DEFINE_integer(
  "steps_per_epoch",
  0,
  "Steps per epoch (the first of each epoch's shuffle); 0: whole epochs, "
  "as the authors train, whatever config.map.steps_per_epoch says.",
)
_REFERENCE_FACE_PY = flags.DEFINE_string(
  "reference_face_py", "", "The authors' encoder/FACE.py; empty: skip it."
)
_REFERENCE_PYTHON = flags.DEFINE_string(
  "reference_python",
  sys.executable,
  "Python with torch and pandas that runs the authors' module.",
)
_RESULTS = flags.DEFINE_string(
  "results", str(_HERE / "results.jsonl"), "JSONL file to append to."
)

flags.mark_flag_as_required("workdir")


def census(tokens) -> dict:
  """How varied [entities, W] descriptor token indices are.

  Returns:
    {"tokens": distinct tokens, "sets": distinct descriptor sets}.
  """
  tokens = np.asarray(tokens)
  return {
    "tokens": int(np.unique(tokens).size),
    "sets": descriptor_quality.distinct_sets(tokens),
  }


def _inputs(config) -> dict:
  """Everything both implementations train on, as numpy arrays."""
  stage_dir = pathlib.Path(_WORKDIR.value) / "pretrain"
  if not (stage_dir / checkpoints.RESULT_FILE).exists():
    raise app.UsageError(
      f"{stage_dir} has no finished pretrain stage; run `python -m "
      f"face_jax.main --workdir={_WORKDIR.value} --stop_after=pretrain` "
      "with the same --config first."
    )
  dataset = data.load_dataset(config.data)
  backbone, graph, backbone_params = pretrain.restore_pretrained(
    config, dataset, stage_dir
  )
  parts = face_stages.load_face_parts(config, dataset, backbone, graph)
  users, items = jax.jit(backbone.embed)(backbone_params, graph)
  make_batches = face_stages.make_stage_batches(
    config, config.map, dataset, face_stages.MAP
  )
  epochs = [make_batches(epoch) for epoch in range(1, _EPOCHS.value + 1)]
  arrays = {
    "user_embeddings": np.asarray(users)[: dataset.num_users],
    "item_embeddings": np.asarray(items)[: dataset.num_items],
    "codebook": np.asarray(parts.codebook)[: len(parts.vocabulary)],
  }
  for epoch, batches in enumerate(epochs, 1):
    for name in ("user", "pos", "neg"):
      arrays[f"epoch{epoch}_{name}"] = np.asarray(batches[name])
  return {
    "parts": parts,
    "backbone_params": backbone_params,
    "arrays": arrays,
  }


def run_face_jax(config, inputs: dict) -> dict:
  """face_jax's FACE module on `inputs`; returns the row's measurements."""
  parts, arrays = inputs["parts"], inputs["arrays"]
  model, face = parts.model, config.face
  backbone_params = inputs["backbone_params"]
  # The job's own FACE init (seed and init rule of the config).
  state = face_stages.initial_map_state(config, parts, backbone_params)
  face_params = state.params[face_stages.FACE]
  # The job's FACE parameter group: Adam without L2.
  optimizer = optimizers.adam_coupled_l2(face.learning_rate)

  def loss_fn(p, x, rng):
    out = model.apply(
      {"params": p},
      x,
      parts.codebook,
      deterministic=False,
      rngs={"dropout": rng},
    )
    loss = (
      face.vq_weight * out["vq_loss"] + face.recon_weight * out["recon_loss"]
    )
    distinct = face_stages.distinct_count(out["token_index"])
    return loss, (out["vq_loss"], out["recon_loss"], distinct)

  @jax.jit
  def step(p, opt_state, x, rng):
    grads, aux = jax.grad(loss_fn, has_aux=True)(p, x, rng)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, aux

  def describe(p) -> np.ndarray:
    tokens = descriptors.describe_all(
      parts,
      {face_stages.BACKBONE: backbone_params, face_stages.FACE: p},
      1024,
    )
    return np.concatenate([tokens["user"], tokens["item"]])

  users = jnp.asarray(arrays["user_embeddings"])
  items = jnp.asarray(arrays["item_embeddings"])
  opt_state = optimizer.init(face_params)
  base_rng = face_stages.stage_rng(config, face_stages.MAP)
  history = {"init": describe(face_params), "epochs": []}
  step_seconds = []
  for epoch in range(1, _EPOCHS.value + 1):
    batch_tokens, vq, recon = [], [], []
    for j in range(len(arrays[f"epoch{epoch}_user"])):
      start = time.perf_counter()
      x = jnp.concatenate(
        [
          users[arrays[f"epoch{epoch}_user"][j]],
          items[arrays[f"epoch{epoch}_pos"][j]],
          items[arrays[f"epoch{epoch}_neg"][j]],
        ]
      )
      rng = jax.random.fold_in(base_rng, len(step_seconds))
      face_params, opt_state, aux = step(face_params, opt_state, x, rng)
      vq.append(float(aux[0]))
      recon.append(float(aux[1]))
      batch_tokens.append(float(aux[2]))
      step_seconds.append(time.perf_counter() - start)
    history["epochs"].append(
      {
        "descriptors": describe(face_params),
        "batch_tokens": float(np.mean(batch_tokens)),
        "vq": [vq[0], vq[-1]],
        "recon": recon[-1],
      }
    )
    logging.info(
      "face_jax epoch %d: %s",
      epoch,
      census(history["epochs"][-1]["descriptors"]),
    )
  # The first step compiles (when there are others to time).
  history["seconds_per_step"] = float(
    np.median(step_seconds[1:] or step_seconds)
  )
  history["steps"] = len(step_seconds)
  return history


def _check_reference() -> None:
  """Fails before any training when the reference cannot run."""
  face_py = pathlib.Path(_REFERENCE_FACE_PY.value)
  if not face_py.is_file():
    raise app.UsageError(
      f"--reference_face_py={face_py} is not a file; give the path of "
      "encoder/FACE.py in a checkout of github.com/YixinRoll/FACE."
    )
  probe = subprocess.run(
    [_REFERENCE_PYTHON.value, "-c", "import pandas, torch"],
    capture_output=True,
    text=True,
    check=False,
  )
  if probe.returncode:
    why = (probe.stderr.strip().splitlines() or ["no message"])[-1]
    raise app.UsageError(
      f"--reference_python={_REFERENCE_PYTHON.value} cannot import torch "
      f"and pandas ({why}); give a Python that has both."
    )


def run_reference(arrays: dict, config) -> dict:
  """The authors' module on the same arrays, in a separate interpreter."""
  with tempfile.TemporaryDirectory(prefix="face_reference_") as scratch:
    scratch = pathlib.Path(scratch)
    np.savez(scratch / "inputs.npz", **arrays)
    settings = {
      "epochs": _EPOCHS.value,
      "num_words": config.face.num_words,
      "word_dim": config.face.word_dim,
      "embed_dim": config.model.embed_dim,
      "learning_rate": config.face.learning_rate,
      "vq_weight": config.face.vq_weight,
      "recon_weight": config.face.recon_weight,
      "seed": config.seed,
    }
    command = [
      _REFERENCE_PYTHON.value,
      str(_HERE / "reference_face_map.py"),
      f"--face_py={pathlib.Path(_REFERENCE_FACE_PY.value).resolve()}",
      f"--inputs={scratch / 'inputs.npz'}",
      f"--settings={json.dumps(settings)}",
      f"--output={scratch / 'history.json'}",
    ]
    logging.info("Running the authors' module: %s", shlex.join(command))
    # Their module writes its vocabulary under ./data/vocabulary; the
    # scratch directory keeps that out of the caller's tree.
    finished = subprocess.run(command, check=False, cwd=scratch)
    if finished.returncode:
      # Its own output above says why; face_jax's row is already written.
      raise SystemExit(
        f"The authors' module stopped with exit status "
        f"{finished.returncode} (negative: killed by that signal, e.g. -9 "
        "when out of memory); no row was written for it."
      )
    return json.loads((scratch / "history.json").read_text())


def _row(config, implementation: str, history: dict, arrays, load) -> dict:
  epochs = history["epochs"]
  init = census(history["init"])
  after = [census(epoch["descriptors"]) for epoch in epochs]
  return {
    "stage": "collapse",
    "implementation": implementation,
    "dataset": config.data.name,
    "model": config.model.backbone,
    "llm": config.llm.model,
    "entities": len(arrays["user_embeddings"]) + len(arrays["item_embeddings"]),
    "codebook": len(arrays["codebook"]),
    "batch": 3 * config.map.batch_size,
    "steps": history["steps"],
    "init_tokens": init["tokens"],
    "init_sets": init["sets"],
    "batch_tokens": [round(e["batch_tokens"], 1) for e in epochs],
    "tokens": [e["tokens"] for e in after],
    "sets": [e["sets"] for e in after],
    "vq": [round(epochs[0]["vq"][0], 4), round(epochs[-1]["vq"][1], 4)],
    "recon": round(epochs[-1]["recon"], 4),
    "seconds_per_step": round(history["seconds_per_step"], 3),
    "load_average": [round(value, 2) for value in load],
    "command": records.command(),
    "machine": records.machine(),
    "date": records.utc_now(),
  }


def main(argv):
  del argv
  config = train.resolve_config(_CONFIG.value)
  if config.face.projection_init != "flat":
    logging.warning(
      "config.face.projection_init=%s; the authors' module always uses "
      "its own (flat) init.",
      config.face.projection_init,
    )
  config.unlock()
  config.map.steps_per_epoch = _STEPS_PER_EPOCH.value
  config.lock()
  if _REFERENCE_FACE_PY.value:
    _check_reference()
  load = os.getloadavg()
  inputs = _inputs(config)
  arrays = inputs["arrays"]
  # Each row is written as soon as it is measured: a failing reference run
  # keeps face_jax's.
  ours = run_face_jax(config, inputs)
  records.append(_RESULTS.value, [_row(config, "face_jax", ours, arrays, load)])
  if _REFERENCE_FACE_PY.value:
    load = os.getloadavg()
    history = run_reference(arrays, config)
    row = _row(config, "authors (PyTorch)", history, arrays, load)
    records.append(_RESULTS.value, [row])


if __name__ == "__main__":
  app.run(main)
