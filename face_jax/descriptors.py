"""Descriptors: every user's and item's W words, exported and measured.

After training, FACE applied deterministically to the backbone's final
embeddings gives each user and item W distinct vocabulary tokens. The
descriptor stage writes them for every entity, beside the profile text they
were aligned to, to `<workdir>/descriptors/`:

- descriptors.jsonl: one JSON object a line, {"type": "user" | "item",
  "id": int, "words": [W strings], "text": profile string or null};
- descriptors.tsv: the same as tab-separated columns type, id, words
  (comma-separated), text.

When the dataset has texts it also measures how well the descriptors speak
for their entity: each entity's descriptor sentence (the training prompt
with the W words as real tokens, e.g. "The user and his likes can be
described as the following words: drama, war, ...") is encoded by the frozen
LLM without dropout and compared by cosine with the profile embeddings of
all entities of its type. The fraction of entities whose own profile ranks
first (top-1) and within the first 10 (top-10) is reported for every
finished FACE stage and for random descriptors (W distinct vocabulary
tokens per entity, seeded), the floor to beat. A profile that ties with the
entity's own counts as ranked above it.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from face_jax import parallel
from face_jax.data import Dataset
from face_jax.models import alignment
from face_jax.models import face as face_lib
from face_jax.training import face_stages
from face_jax.training.writer import MetricWriter

STAGE = "descriptors"
JSONL_FILE = "descriptors.jsonl"
TSV_FILE = "descriptors.tsv"
ENTITY_TYPES = {"user": alignment.USER, "item": alignment.ITEM}

# Seed stream of the random descriptors and of the entity sample.
_RANDOM_STREAM = 30


def _in_batches(
  fn: Callable[..., jax.Array], arrays: Sequence[np.ndarray], batch_size: int
) -> np.ndarray:
  """fn over fixed-size row batches of arrays (the last padded), joined.

  Fixed shapes let a jitted fn compile once.

  Args:
    fn: batch of each array -> [batch_size, ...] result.
    arrays: arrays with the same number of rows.
    batch_size: rows per call.

  Returns:
    The results of all rows, concatenated, padding dropped.
  """
  count = arrays[0].shape[0]
  outputs = []
  for start in range(0, count, batch_size):
    size = min(batch_size, count - start)
    batches = [
      np.pad(
        array[start : start + size],
        [(0, batch_size - size)] + [(0, 0)] * (array.ndim - 1),
      )
      for array in arrays
    ]
    outputs.append(np.asarray(fn(*batches))[:size])
  return np.concatenate(outputs)


def describe_all(
  parts: face_stages.FaceParts, params: dict, batch_size: int
) -> dict[str, np.ndarray]:
  """Every user's and item's descriptor tokens.

  Args:
    parts: the FACE stage parts.
    params: {"backbone", "face"} params.
    batch_size: entities per FACE call.

  Returns:
    {"user": [num_users, W], "item": [num_items, W]} int32 indices into
    the vocabulary.
  """
  # TODO(#5): np.asarray below needs arrays whole on this host; on several
  # hosts gather them first (multihost_utils.process_allgather).
  users, items = jax.jit(parts.backbone.embed)(
    params[face_stages.BACKBONE], parts.graph
  )
  face_params = params[face_stages.FACE]

  @jax.jit
  def describe(x):
    return parts.model.apply(
      {"params": face_params},
      x,
      parts.codebook,
      method=face_lib.FACE.describe,
    )

  return {
    "user": _in_batches(describe, [np.asarray(users)], batch_size),
    "item": _in_batches(describe, [np.asarray(items)], batch_size),
  }


def random_descriptors(
  count: int, vocabulary_size: int, num_words: int, rng: np.random.Generator
) -> np.ndarray:
  """[count, num_words] int32: distinct uniform vocabulary indices a row."""
  if num_words > vocabulary_size:
    raise ValueError(
      f"Cannot draw {num_words} distinct tokens from {vocabulary_size}; use "
      "fewer words or a larger vocabulary."
    )
  chunks = []
  # The smallest num_words of uniform keys are a uniform sample without
  # replacement; rows in chunks keep the key matrix small.
  for start in range(0, count, 1024):
    keys = rng.random((min(1024, count - start), vocabulary_size))
    picked = np.argpartition(keys, num_words - 1, axis=1)[:, :num_words]
    chunks.append(picked)
  if not chunks:
    return np.zeros((0, num_words), np.int32)
  return np.concatenate(chunks).astype(np.int32)


def sentence_ids(
  layout: alignment.SentenceLayout, entity_type: int, word_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Token ids of descriptor sentences with the words as real tokens.

  Args:
    layout: the sentence layout of the FACE stages.
    entity_type: alignment.USER or alignment.ITEM.
    word_ids: [n, W] LLM token ids of the words.

  Returns:
    (ids [n, T], mask [n, T]) int32.
  """
  slots = np.asarray(layout.word_slot[entity_type])
  fixed = np.asarray(layout.token_ids[entity_type])
  words = word_ids[:, np.maximum(slots, 0)]
  ids = np.where(slots >= 0, words, fixed).astype(np.int32)
  mask = np.broadcast_to(np.asarray(layout.mask[entity_type]), ids.shape)
  return ids, mask.astype(np.int32)


def self_retrieval(
  queries: np.ndarray,
  targets: np.ndarray,
  rows: np.ndarray,
  ks: Sequence[int],
  chunk: int = 1024,
) -> dict[str, float]:
  """How often a query's own target is among the most similar targets.

  The rank of query i is the number of other targets whose dot product with
  it is at least that of its own target rows[i] (ties count against it).

  Args:
    queries: [m, h] L2-normalised query embeddings.
    targets: [n, h] L2-normalised target embeddings.
    rows: [m] index of each query's own target.
    ks: cut-offs.
    chunk: queries compared at once.

  Returns:
    {"top{k}": fraction of queries of rank < k} for every k, and
    "mean_rank" (0-based).
  """
  ranks = []
  for start in range(0, len(rows), chunk):
    block = queries[start : start + chunk] @ targets.T
    own_rows = rows[start : start + chunk]
    own = block[np.arange(len(own_rows)), own_rows]
    # Every query counts itself once among the targets at least as close.
    ranks.append(np.sum(block >= own[:, None], axis=1) - 1)
  rank = np.concatenate(ranks) if ranks else np.zeros(0)
  result = {f"top{k}": float(np.mean(rank < k)) for k in ks}
  result["mean_rank"] = float(np.mean(rank))
  return result


def _write_atomic(path: pathlib.Path, lines: Sequence[str]) -> None:
  descriptor, temporary = tempfile.mkstemp(
    dir=path.parent, prefix=f".{path.name}."
  )
  try:
    with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
      stream.writelines(line + "\n" for line in lines)
    os.replace(temporary, path)
  except BaseException:
    os.unlink(temporary)
    raise


def _one_line(text: str) -> str:
  return " ".join(text.split())


def write_descriptors(
  folder: pathlib.Path,
  words: Sequence[str],
  tokens: dict[str, np.ndarray],
  dataset: Dataset,
) -> None:
  """Writes descriptors.jsonl and descriptors.tsv (see the module doc).

  Args:
    folder: destination folder.
    words: the vocabulary's words, by vocabulary index.
    tokens: {"user": [num_users, W], "item": [num_items, W]} indices.
    dataset: the dataset (for its texts).
  """
  texts = {"user": dataset.user_text, "item": dataset.item_text}
  jsonl, tsv = [], ["type\tid\twords\ttext"]
  for kind, rows in tokens.items():
    for entity, row in enumerate(rows):
      chosen = [words[index] for index in row]
      text = None if texts[kind] is None else texts[kind][entity]
      record = {"type": kind, "id": entity, "words": chosen, "text": text}
      jsonl.append(json.dumps(record, ensure_ascii=False))
      tsv.append(
        f"{kind}\t{entity}\t{', '.join(chosen)}\t{_one_line(text or '')}"
      )
  folder.mkdir(parents=True, exist_ok=True)
  _write_atomic(folder / JSONL_FILE, jsonl)
  _write_atomic(folder / TSV_FILE, tsv)


class _RetrievalProbe:
  """Encodes descriptor sentences and ranks them against the profiles."""

  def __init__(self, config, parts, dataset, workdir):
    self._llm = parts.llm
    self._vocab_ids = np.asarray(parts.vocabulary.token_ids)
    self._layout = face_stages.sentence_layout(
      parts.llm, config.data.item_noun, config.face.num_words
    )
    users, items = face_stages.profile_targets(
      config, parts.llm, dataset, workdir
    )
    self._profiles = {"user": users, "item": items}
    self._batch_size = config.descriptors.encode_batch_size
    self._ks = tuple(config.descriptors.ks)
    rng = np.random.default_rng([config.seed, _RANDOM_STREAM])
    limit = config.descriptors.max_entities
    self.rows = {}
    for kind, profiles in self._profiles.items():
      count = len(profiles)
      chosen = np.arange(count)
      if 0 < limit < count:
        chosen = np.sort(rng.choice(count, limit, replace=False))
      self.rows[kind] = chosen
    self._encode = jax.jit(self._llm.encode_ids)

  def measure(self, tokens: dict[str, np.ndarray]) -> dict[str, Any]:
    """Top-k self-retrieval per entity type for vocabulary indices."""
    result = {}
    for kind, rows in self.rows.items():
      word_ids = self._vocab_ids[tokens[kind][rows]]
      ids, mask = sentence_ids(self._layout, ENTITY_TYPES[kind], word_ids)
      queries = _in_batches(
        lambda ids, mask: self._encode(self._llm.params, ids, mask),
        [ids, mask],
        self._batch_size,
      )
      result[kind] = self_retrieval(
        queries, self._profiles[kind], rows, self._ks
      )
      result[kind]["entities"] = len(rows)
    return result


def run_descriptors(
  config: ml_collections.ConfigDict,
  dataset: Dataset,
  stage_dir: pathlib.Path,
  writer: MetricWriter,
) -> dict[str, Any]:
  """Exports the final descriptors and measures their retrieval quality.

  Args:
    config: the resolved experiment config.
    dataset: the dataset.
    stage_dir: `<workdir>/descriptors`.
    writer: unused (the results go to metrics.json).

  Returns:
    {"after": the FACE stage described, "files", "distinct_tokens",
    "retrieval": {stage or "random": {"user": {...}, "item": {...}}} (only
    with texts)}.
  """
  del writer  # One result per run, kept in metrics.json.
  workdir = stage_dir.parent
  after = face_stages.last_face_stage(workdir)
  if after is None:
    raise FileNotFoundError(
      f"No finished map stage in {workdir}; run the map stage first."
    )
  parts = face_stages.load_face_parts(config, dataset)
  batch_size = config.descriptors.batch_size
  tokens = {
    stage: describe_all(
      parts,
      face_stages.restore_face_params(config, parts, workdir / stage),
      batch_size,
    )
    for stage in face_stages.finished_face_stages(workdir)
  }
  if parallel.is_main_process():
    write_descriptors(stage_dir, parts.vocabulary.words, tokens[after], dataset)
  final = np.concatenate([tokens[after]["user"], tokens[after]["item"]])
  result = {
    "after": after,
    "files": [JSONL_FILE, TSV_FILE],
    "num_words": config.face.num_words,
    "vocabulary_size": len(parts.vocabulary),
    "distinct_tokens": len(np.unique(final)),
  }
  for kind in ENTITY_TYPES:
    logging.info(
      "descriptors of %s 0: %s",
      kind,
      ", ".join(parts.vocabulary.words[i] for i in tokens[after][kind][0]),
    )
  if not dataset.has_text:
    logging.info("No texts: descriptors exported without retrieval scores.")
    return result
  probe = _RetrievalProbe(config, parts, dataset, workdir)
  rng = np.random.default_rng([config.seed, _RANDOM_STREAM, 1])
  tokens["random"] = {
    kind: random_descriptors(
      count, len(parts.vocabulary), config.face.num_words, rng
    )
    for kind, count in (
      ("user", dataset.num_users),
      ("item", dataset.num_items),
    )
  }
  result["retrieval"] = {name: probe.measure(t) for name, t in tokens.items()}
  for name, scores in result["retrieval"].items():
    logging.info("descriptor retrieval, %s: %s", name, scores)
  return result
