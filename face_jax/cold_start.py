"""The cold_start stage: users and items ranked from their text alone.

With `config.cold_start.enabled`, the training stages run on the warm
dataset (see `face_jax.data.cold_start`); this stage then ranks the cold
entities, which no stage has seen, by four methods:

- face: a text head (an MLP) is trained on the warm entities to map the
  frozen LLM's embedding of a profile to that entity's quantised FACE
  words, the mapped-codebook rows of its descriptors [W, word_dim]. For a
  cold entity the head's prediction is quantised by FACE's own quantiser
  (greedy distinct nearest tokens), giving its W descriptors, and FACE's
  decoder turns those words into a CF embedding that is scored by dot
  product against the warm entities' final backbone embeddings. Only the
  trained FACE model, the frozen LLM and the head are used.
- alpharec: an AlphaRec-style mapper, an MLP of the same size trained on
  the warm entities to regress their final backbone embeddings from their
  profile embeddings; the cold entity's mapped embedding is scored alike.
- text: cosine between the user's profile embedding and the item's.
- random: the exact expected metrics of a uniformly random ranking.

Separate heads are trained for users and for items. The backbone is the
one of the last FACE stage (align, else map), the same for every method.

What is ranked:

- cold items: each warm user with at least one interaction with a cold
  item ranks all cold items (and only them); the relevant items are those
  cold items it interacted with, in any original split.
- cold users: each cold user with at least one interaction with a warm
  item ranks all warm items; the relevant items are those it interacted
  with, in any original split.

Nothing is excluded from either ranking (no ranked item was ever trained
on for the ranking user). Recall@K and NDCG@K are those of
`face_jax.evaluation.ranking`, averaged over the ranking users.

The stage writes its results to metrics.json and the cold entities'
descriptors to `<workdir>/cold_start/cold_descriptors.jsonl`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from face_jax import descriptors, parallel
from face_jax.data import Dataset
from face_jax.data import cold_start as split_lib
from face_jax.evaluation import (
  RankingTask,
  descriptor_quality,
  prepare_ranking,
  rank_metrics,
)
from face_jax.models import face as face_lib
from face_jax.models import quantizer
from face_jax.training import face_stages
from face_jax.training.loop import describe_metrics
from face_jax.training.writer import MetricWriter

STAGE = "cold_start"
DESCRIPTORS_FILE = "cold_descriptors.jsonl"
METHODS = ("face", "alpharec", "text", "random")

# Seed stream of the heads' initialisation, held-out rows and shuffles.
_HEAD_STREAM = 40
# Entities per FACE call when decoding words.
_DECODE_BATCH = 256


class ColdStartStageError(ValueError):
  """The cold_start stage cannot run with this config or workdir."""


class TextHead(nn.Module):
  """Profile embedding -> a target of shape `out_shape`: one hidden layer.

  Attributes:
    hidden_dim: width of the hidden layer (GELU).
    out_shape: shape of one prediction, e.g. (W, word_dim) or (d,).
  """

  hidden_dim: int
  out_shape: tuple[int, ...]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps x [n, h] to [n, *out_shape]."""
    hidden = nn.gelu(nn.Dense(self.hidden_dim)(x))
    out = nn.Dense(math.prod(self.out_shape))(hidden)
    return out.reshape(x.shape[0], *self.out_shape)


@dataclasses.dataclass(frozen=True)
class FittedHead:
  """A trained head.

  Attributes:
    model: the module.
    params: its params at the best epoch.
    epochs: epochs run.
    best_epoch: the epoch of `params` (1-based).
    valid_loss: held-out MSE at the best epoch (train MSE without a
      held-out part).
  """

  model: TextHead
  params: Any
  epochs: int
  best_epoch: int
  valid_loss: float

  def __call__(self, x: np.ndarray) -> np.ndarray:
    return np.asarray(self.model.apply({"params": self.params}, x))

  def summary(self) -> dict[str, Any]:
    return {
      "epochs": self.epochs,
      "best_epoch": self.best_epoch,
      "valid_mse": self.valid_loss,
    }


def fit_head(
  inputs: np.ndarray,
  targets: np.ndarray,
  section: ml_collections.ConfigDict,
  seed: Sequence[int],
) -> FittedHead:
  """Trains a `TextHead` to regress targets from inputs by MSE.

  A seeded `section.valid_share` of the rows is held out; training stops
  after `section.patience` epochs without a lower held-out MSE and keeps
  the best epoch's params.

  Args:
    inputs: [n, h] float32 profile embeddings.
    targets: [n, ...] float32 targets.
    section: config.cold_start.
    seed: seed of the initialisation, held-out rows and shuffles.

  Returns:
    The fitted head.
  """
  inputs = np.asarray(inputs, np.float32)
  targets = np.asarray(targets, np.float32)
  count = len(inputs)
  rng = np.random.default_rng([*seed, _HEAD_STREAM])
  order = rng.permutation(count)
  num_valid = round(section.valid_share * count)
  num_valid = min(num_valid, count - 1)
  valid_rows, train_rows = order[:num_valid], order[num_valid:]
  model = TextHead(section.hidden_dim, tuple(targets.shape[1:]))
  key = jax.random.key(int(rng.integers(2**31)))
  params = model.init(key, inputs[:1])["params"]
  optimizer = optax.adamw(
    section.learning_rate, weight_decay=section.weight_decay
  )
  opt_state = optimizer.init(params)

  def loss_fn(params, x, y):
    return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

  @jax.jit
  def step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  check_rows = valid_rows if num_valid else train_rows
  check_loss = jax.jit(loss_fn)
  batch = min(section.batch_size, len(train_rows))
  best = (math.inf, params, 0)
  epoch = 0
  for epoch in range(1, section.max_epochs + 1):
    shuffled = train_rows[rng.permutation(len(train_rows))]
    steps = -(-len(shuffled) // batch)
    # The last batch is filled up with the epoch's first rows, so every
    # step has one shape and the step compiles once.
    shuffled = np.resize(shuffled, steps * batch).reshape(steps, batch)
    for rows in shuffled:
      params, opt_state = step(params, opt_state, inputs[rows], targets[rows])
    loss = float(check_loss(params, inputs[check_rows], targets[check_rows]))
    if loss < best[0]:
      best = (loss, params, epoch)
    elif epoch - best[2] >= section.patience:
      break
  return FittedHead(model, best[1], epoch, best[2], best[0])


@functools.partial(jax.jit, static_argnums=0)
def _map_codebook(model, face_params, token_table):
  return model.apply(
    {"params": face_params}, token_table, method=face_lib.FACE.map_codebook
  )


# The module is static (hashed by its fields), so every call with the same
# FACE shapes reuses one compiled program.
@functools.partial(jax.jit, static_argnums=0)
def _decode_words(model, face_params, codebook, words):
  quantized = quantizer.quantize(
    words, codebook, model.chunk_size, model.num_tokens
  )
  decoded = model.apply(
    {"params": face_params},
    quantized.z_q,
    deterministic=True,
    method=face_lib.FACE.decode,
  )
  return quantized.token_index, decoded


def words_to_embeddings(
  model: face_lib.FACE,
  face_params: dict,
  token_table: jax.Array,
  words: np.ndarray,
  batch_size: int = _DECODE_BATCH,
) -> tuple[np.ndarray, np.ndarray]:
  """Quantises predicted words to distinct tokens and decodes them.

  Deterministic: the quantiser's search breaks ties by the lowest index
  and the decoder runs without dropout.

  Args:
    model: the FACE module.
    face_params: its trained params.
    token_table: [v, token_dim] the frozen token rows of the vocabulary.
    words: [n, W, word_dim] predicted words (in the mapped codebook's
      space).
    batch_size: entities per call.

  Returns:
    (token_index [n, W] int32 vocabulary indices, embeddings [n, d]).
  """
  mapped = _map_codebook(model, face_params, token_table)
  tokens, embeddings = [], []
  for start in range(0, len(words), batch_size):
    chunk = np.asarray(words[start : start + batch_size], np.float32)
    size = len(chunk)
    # Fixed-shape batches: one compilation; padding rows are dropped.
    chunk = np.pad(chunk, ((0, batch_size - size), (0, 0), (0, 0)))
    index, decoded = _decode_words(model, face_params, mapped, chunk)
    index, decoded = parallel.to_host((index, decoded))
    tokens.append(index[:size])
    embeddings.append(decoded[:size])
  width = model.embed_dim
  if not tokens:
    return np.zeros((0, model.num_words), np.int32), np.zeros((0, width))
  return np.concatenate(tokens), np.concatenate(embeddings)


def cold_ranking(
  pairs: np.ndarray, num_queries: int, num_candidates: int, batch_size: int
) -> RankingTask:
  """The ranking task of cold-start test pairs, nothing excluded.

  Args:
    pairs: [n, 2] (query, candidate) relevant pairs, sorted.
    num_queries: rows of the query table.
    num_candidates: rows of the candidate table.
    batch_size: queries scored at once.
  """
  empty = np.zeros((0, 2), np.int32)
  tables = Dataset(STAGE, num_queries, num_candidates, empty, empty, pairs)
  return prepare_ranking(tables, "test", batch_size)


def random_expectation(
  pairs: np.ndarray, num_candidates: int, ks: Sequence[int]
) -> dict[str, float]:
  """Exact expected Recall@K and NDCG@K of a uniformly random ranking.

  Each of the K top positions holds a relevant item with probability
  n / N for a query with n relevant of N candidates, so the expected
  recall is K / N and the expected DCG is (n / N) * sum_{r<=K}
  1 / log2(r + 1); both are averaged over the queries like the metrics.

  Args:
    pairs: [m, 2] (query, candidate) relevant pairs.
    num_candidates: N.
    ks: cut-offs.
  """
  _, counts = np.unique(pairs[:, 0], return_counts=True)
  discount = 1.0 / np.log2(np.arange(max(ks)) + 2.0)
  result = {}
  for k in ks:
    ideal = np.cumsum(discount)[np.minimum(counts, k) - 1]
    dcg = counts / num_candidates * discount[:k].sum()
    result[f"recall@{k}"] = float(min(k, num_candidates) / num_candidates)
    result[f"ndcg@{k}"] = float(np.mean(dcg / ideal))
  return result


def _check_ks(ks: Sequence[int], num_candidates: int, kind: str) -> None:
  if not ks or min(ks) < 1 or max(ks) > num_candidates:
    raise ColdStartStageError(
      f"config.cold_start.ks={tuple(ks)} must lie in 1..{num_candidates}, "
      f"the number of candidates of the cold {kind}s; lower the cut-offs "
      "or raise the share."
    )


@dataclasses.dataclass(frozen=True)
class Side:
  """One entity type's tables for scoring, all rows of the warm dataset or
  of the cold entities of that type.

  Attributes:
    warm_cf: [warm, d] final backbone embeddings of the warm entities.
    warm_profiles: [warm, h] their profile embeddings.
    cold_profiles: [cold, h] profile embeddings of the cold entities.
  """

  warm_cf: np.ndarray
  warm_profiles: np.ndarray
  cold_profiles: np.ndarray


def score_cold(
  *,
  kind: str,
  pairs: np.ndarray,
  cold_tables: dict[str, np.ndarray],
  other: Side,
  ks: Sequence[int],
  batch_size: int,
  tie_seed: int = 0,
) -> dict[str, Any]:
  """Cold-start metrics of every method for one entity type.

  Candidates are ranked in a seeded random order, so that tied scores
  (cold entities whose descriptors, hence decoded embeddings, coincide)
  fall in random order rather than by id, which would score a collapsed
  model by the accident of id order.

  Args:
    kind: "item" (cold items ranked for warm users) or "user" (warm items
      ranked for cold users).
    pairs: relevant pairs, (warm user, cold item) or (cold user, warm
      item), numbered as `face_jax.data.cold_start` numbers them.
    cold_tables: method -> [cold, width] table of the cold entities (the
      "text" table holds their profile embeddings).
    other: the warm tables of the other entity type.
    ks: cut-offs.
    batch_size: queries scored at once.
    tie_seed: seed of the candidates' order, which breaks ties.

  Returns:
    {method: metrics} for METHODS, plus "queries" (ranking users),
    "candidates" and "pairs".
  """
  num_cold = len(cold_tables["text"])
  warm_tables = {
    "face": other.warm_cf,
    "alpharec": other.warm_cf,
    "text": other.warm_profiles,
  }
  if kind == "item":
    num_queries, num_candidates = len(other.warm_cf), num_cold
  else:
    num_queries, num_candidates = num_cold, len(other.warm_cf)
  _check_ks(ks, num_candidates, kind)
  # Candidate c sits at position rank_of[c]; top-k breaks ties by position.
  order = np.random.default_rng(tie_seed).permutation(num_candidates)
  rank_of = np.empty_like(order)
  rank_of[order] = np.arange(num_candidates)
  shuffled = np.stack([pairs[:, 0], rank_of[pairs[:, 1]]], axis=1)
  shuffled = shuffled[np.lexsort((shuffled[:, 1], shuffled[:, 0]))]
  task = cold_ranking(shuffled, num_queries, num_candidates, batch_size)
  result = {}
  for method, warm in warm_tables.items():
    cold = cold_tables[method]
    queries, candidates = (warm, cold) if kind == "item" else (cold, warm)
    candidates = np.asarray(candidates)[order]
    result[method] = rank_metrics(
      jnp.asarray(queries, jnp.float32),
      jnp.asarray(candidates, jnp.float32),
      task,
      ks,
    )
  result["random"] = random_expectation(pairs, num_candidates, ks)
  result["queries"] = task.num_users
  result["candidates"] = num_candidates
  result["pairs"] = len(pairs)
  return result


def skip_reason(
  config: ml_collections.ConfigDict, dataset: Dataset
) -> str | None:
  """None when the stage can run, else why not (it needs texts)."""
  del config  # Only the dataset decides.
  if dataset.has_text:
    return None
  return (
    f"{dataset.name} has no user and item profiles, and cold entities are "
    "described from their text alone; give the dataset texts and rerun "
    "with the same workdir."
  )


def _cold_profiles(
  config: ml_collections.ConfigDict,
  parts: face_stages.FaceParts,
  texts: Sequence[str],
  name: str,
  workdir: pathlib.Path,
) -> np.ndarray:
  if not texts:
    return np.zeros((0, parts.llm.info.hidden_size), np.float32)
  return face_stages.config_profile_embeddings(
    config, parts.llm, texts, name, workdir
  )


def run_cold_start(
  config: ml_collections.ConfigDict,
  dataset: Dataset,
  stage_dir: pathlib.Path,
  writer: MetricWriter,
  *,
  full_dataset: Dataset,
  split: split_lib.ColdStartSplit,
) -> dict[str, Any]:
  """Trains the heads on warm entities and ranks the cold ones.

  Args:
    config: the resolved experiment config.
    dataset: the warm dataset the other stages trained on.
    stage_dir: `<workdir>/cold_start`.
    writer: unused (the results go to metrics.json).
    full_dataset: the dataset before the split.
    split: the run's cold-start split.

  Returns:
    {"after": the FACE stage used, "item" and "user": see `score_cold`,
    with "distinct_descriptor_sets" and "distinct_tokens" of the cold
    entities' descriptors (absent for a type with no cold entities),
    "heads": {type: {"face", "alpharec": head summaries}}, "cold_users",
    "cold_items", "cold_cold_pairs": interactions between two cold
    entities (not evaluated), "files"}.

  Raises:
    ColdStartStageError: no FACE stage has finished.
  """
  del writer  # One result per run, kept in metrics.json.
  workdir = stage_dir.parent
  after = face_stages.last_face_stage(workdir)
  if after is None:
    raise ColdStartStageError(
      f"No finished map stage in {workdir}; run the earlier stages first."
    )
  section = config.cold_start
  parts = face_stages.load_face_parts(config, dataset)
  params = face_stages.restore_face_params(config, parts, workdir / after)
  face_params = params[face_stages.FACE]
  # Gathered whole on every process: on several hosts the tables and the
  # mapped codebook are sharded across processes, and the heads and the
  # ranking below run on each host's own devices.
  users_cf, items_cf = parallel.to_host(
    jax.jit(parts.backbone.embed)(params[face_stages.BACKBONE], parts.graph)
  )
  tokens = descriptors.describe_all(
    parts, params, config.descriptors.batch_size
  )
  mapped = parallel.to_host(
    _map_codebook(parts.model, face_params, parts.codebook)
  )
  warm_users, warm_items = face_stages.profile_targets(
    config, parts.llm, dataset, workdir
  )
  cold_ids = {"user": split.cold_users, "item": split.cold_items}
  full_texts = {"user": full_dataset.user_text, "item": full_dataset.item_text}
  texts = {
    kind: [full_texts[kind][i] for i in ids] for kind, ids in cold_ids.items()
  }
  sides = {
    kind: Side(
      warm_cf=cf,
      warm_profiles=profiles,
      cold_profiles=_cold_profiles(
        config, parts, texts[kind], f"cold_{kind}", workdir
      ),
    )
    for kind, cf, profiles in (
      ("user", users_cf, warm_users),
      ("item", items_cf, warm_items),
    )
  }
  result: dict[str, Any] = {
    "after": after,
    "cold_users": len(split.cold_users),
    "cold_items": len(split.cold_items),
    "cold_cold_pairs": split_lib.cold_cold_count(full_dataset, split),
    "heads": {},
    "files": [DESCRIPTORS_FILE],
  }
  pair_makers = {
    "user": split_lib.cold_user_pairs,
    "item": split_lib.cold_item_pairs,
  }
  records = []
  for index, kind in enumerate(("user", "item")):
    side = sides[kind]
    if not len(side.cold_profiles):
      continue
    seed = (config.seed, index)
    words_head = fit_head(
      side.warm_profiles, mapped[tokens[kind]], section, (*seed, 0)
    )
    mapper = fit_head(side.warm_profiles, side.warm_cf, section, (*seed, 1))
    result["heads"][kind] = {
      "face": words_head.summary(),
      "alpharec": mapper.summary(),
    }
    cold_tokens, face_table = words_to_embeddings(
      parts.model, face_params, parts.codebook, words_head(side.cold_profiles)
    )
    cold_tables = {
      "face": face_table,
      "alpharec": mapper(side.cold_profiles),
      "text": side.cold_profiles,
    }
    other = sides["item" if kind == "user" else "user"]
    result[kind] = score_cold(
      kind=kind,
      pairs=pair_makers[kind](full_dataset, split),
      cold_tables=cold_tables,
      other=other,
      tie_seed=config.seed,
      ks=tuple(section.ks),
      batch_size=config.eval.batch_size,
    )
    # Heads that collapse to one output give every cold entity the same
    # words; these counts show how varied the descriptors are.
    result[kind]["distinct_descriptor_sets"] = descriptor_quality.distinct_sets(
      cold_tokens
    )
    result[kind]["distinct_tokens"] = len(np.unique(cold_tokens))
    for entity, row, text in zip(
      cold_ids[kind], cold_tokens, texts[kind], strict=True
    ):
      words = [parts.vocabulary.words[i] for i in row]
      records.append(
        {"type": kind, "id": int(entity), "words": words, "text": text}
      )
    for method in METHODS:
      logging.info(
        "cold %ss, %s: %s",
        kind,
        method,
        describe_metrics(result[kind][method]),
      )
  if parallel.is_main_process():
    descriptors.write_atomic(
      stage_dir / DESCRIPTORS_FILE,
      [json.dumps(record, ensure_ascii=False) for record in records],
    )
  return result
