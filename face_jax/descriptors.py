"""Descriptors: every user's and item's W words, exported and measured.

After training, FACE applied deterministically to the backbone's final
embeddings gives each user and item W distinct vocabulary tokens. The
descriptor stage writes them for every entity, beside the profile text they
were aligned to, to `<workdir>/descriptors/`:

- descriptors.jsonl: one JSON object a line, {"type": "user" | "item",
  "id": int, "words": [W strings], "text": profile string or null};
- descriptors.tsv: the same as tab-separated columns type, id, words
  (comma-separated), text.

It also measures the descriptors (see
`face_jax.evaluation.descriptor_quality`): codebook usage (distinct tokens,
perplexity, most used words), stability (share of words unchanged from the
map to the align stage) and, when the dataset has texts, how well they
speak for their entity: each entity's descriptor sentence (the training
prompt with the W words as real tokens, e.g. "The user and his likes can be
described as the following words: drama, war, ...") is encoded by the frozen
LLM without dropout and compared by cosine with the profile embeddings of
all entities of its type. The fraction of entities whose own profile ranks
first (top-1) and within the first 10 (top-10) is reported for every
finished FACE stage and for shuffled descriptors (the last stage's,
permuted across the entities of a type), the floor to beat. A profile that
ties with the entity's own counts as ranked above it.

`python -m face_jax.quality --workdir=...` computes the same measures for
any workdir whose FACE stages have finished.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging

from face_jax import parallel
from face_jax.data import Dataset
from face_jax.evaluation import descriptor_quality as descriptor_quality_lib
from face_jax.models import alignment
from face_jax.models import face as face_lib
from face_jax.training import face_stages
from face_jax.training.writer import MetricWriter

STAGE = "descriptors"
JSONL_FILE = "descriptors.jsonl"
TSV_FILE = "descriptors.tsv"
ENTITY_TYPES = {"user": alignment.USER, "item": alignment.ITEM}

# Seed stream of the shuffled descriptors and of the entity sample.
_RANDOM_STREAM = 30


def _in_batches(
  fn: Callable[..., jax.Array],
  arrays: Sequence[np.ndarray],
  batch_size: int,
  progress: str | None = None,
) -> np.ndarray:
  """fn over fixed-size row batches of arrays (the last padded), joined.

  Fixed shapes let a jitted fn compile once.

  Args:
    fn: batch of each array -> [batch_size, ...] result.
    arrays: arrays with the same number of rows.
    batch_size: rows per call.
    progress: label of a progress bar over the rows; None for none.

  Returns:
    The results of all rows, concatenated, padding dropped.
  """
  count = arrays[0].shape[0]
  outputs = []
  starts = range(0, count, batch_size)
  if progress is not None:
    starts = tqdm.tqdm(starts, desc=progress, unit="batch", leave=False)
  for start in starts:
    size = min(batch_size, count - start)
    batches = [
      np.pad(
        array[start : start + size],
        [(0, batch_size - size)] + [(0, 0)] * (array.ndim - 1),
      )
      for array in arrays
    ]
    outputs.append(parallel.to_host(fn(*batches))[:size])
  return np.concatenate(outputs)


def describe_all(
  parts: face_stages.FaceParts,
  params: dict,
  batch_size: int,
  progress: str | None = None,
) -> dict[str, np.ndarray]:
  """Every user's and item's descriptor tokens.

  Args:
    parts: the FACE stage parts.
    params: {"backbone", "face"} params.
    batch_size: entities per FACE call.
    progress: label of progress bars over the entities; None for none.

  Returns:
    {"user": [num_users, W], "item": [num_items, W]} int32 indices into
    the vocabulary.
  """
  # On several hosts the tables and the FACE params are sharded across
  # processes: they enter the jitted calls as arguments (a jitted function
  # may not close over them) and the tables come to the host gathered.
  users, items = parallel.to_host(
    jax.jit(parts.backbone.embed)(params[face_stages.BACKBONE], parts.graph)
  )
  face_params = params[face_stages.FACE]
  describe = jax.jit(
    functools.partial(parts.model.apply, method=face_lib.FACE.describe)
  )
  return {
    kind: _in_batches(
      lambda x: describe({"params": face_params}, x, parts.codebook),
      [table],
      batch_size,
      None if progress is None else f"{progress} {kind}s",
    )
    for kind, table in (("user", users), ("item", items))
  }


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


def write_atomic(path: pathlib.Path, lines: Sequence[str]) -> None:
  """Writes lines to path whole or not at all (temporary file, rename)."""
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
  write_atomic(folder / JSONL_FILE, jsonl)
  write_atomic(folder / TSV_FILE, tsv)


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
    self._progress = config.log.progress_bar

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
        f"retrieval {kind}s" if self._progress else None,
      )
      result[kind] = self_retrieval(
        queries, self._profiles[kind], rows, self._ks
      )
      result[kind]["entities"] = len(rows)
    return result


def describe_stages(
  config: ml_collections.ConfigDict,
  parts: face_stages.FaceParts,
  workdir: pathlib.Path,
) -> dict[str, dict[str, np.ndarray]]:
  """The descriptors after every finished FACE stage of a workdir.

  Args:
    config: the resolved experiment config of the workdir.
    parts: the FACE stage parts.
    workdir: the experiment folder.

  Returns:
    Stage ("map", then "align" when finished) -> `describe_all` result.

  Raises:
    FileNotFoundError: no FACE stage has finished in workdir.
  """
  stages = face_stages.finished_face_stages(workdir)
  if not stages:
    raise FileNotFoundError(
      f"No finished map stage in {workdir}; run the map stage first."
    )
  return {
    stage: describe_all(
      parts,
      face_stages.restore_face_params(config, parts, workdir / stage),
      config.descriptors.batch_size,
      progress=f"describe ({stage})" if config.log.progress_bar else None,
    )
    for stage in stages
  }


def _both_types(tokens: dict[str, np.ndarray]) -> np.ndarray:
  return np.concatenate([tokens["user"], tokens["item"]])


def descriptor_quality(
  config: ml_collections.ConfigDict,
  dataset: Dataset,
  parts: face_stages.FaceParts,
  workdir: pathlib.Path,
  tokens: dict[str, dict[str, np.ndarray]],
) -> dict[str, Any]:
  """Usage, stability and retrieval quality of a run's descriptors.

  Args:
    config: the resolved experiment config of the workdir.
    dataset: its dataset.
    parts: the FACE stage parts.
    workdir: the experiment folder (for the cached profile embeddings).
    tokens: `describe_stages(config, parts, workdir)`.

  Returns:
    {"usage": {"all", "user", "item": `codebook_usage` of the last
    stage's descriptors}, "stability": {"all", "user", "item": share of
    words unchanged from map to align} (only when align finished),
    "retrieval": {stage or "shuffled": {"user", "item": top-k profile
    retrieval}} (only with texts; "shuffled" is the last stage's
    descriptors permuted across entities, the floor)}.
  """
  words = parts.vocabulary.words
  final = tokens[list(tokens)[-1]]
  result = {
    "usage": {
      "all": descriptor_quality_lib.codebook_usage(_both_types(final), words),
      **{
        kind: descriptor_quality_lib.codebook_usage(final[kind], words)
        for kind in ENTITY_TYPES
      },
    }
  }
  if face_stages.ALIGN in tokens:
    before, after = tokens[face_stages.MAP], tokens[face_stages.ALIGN]
    result["stability"] = {
      "all": descriptor_quality_lib.stability(
        _both_types(before), _both_types(after)
      ),
      **{
        kind: descriptor_quality_lib.stability(before[kind], after[kind])
        for kind in ENTITY_TYPES
      },
    }
  if not dataset.has_text:
    logging.info("No texts: descriptors without retrieval scores.")
    return result
  probe = _RetrievalProbe(config, parts, dataset, workdir)
  rng = np.random.default_rng([config.seed, _RANDOM_STREAM, 1])
  measured = dict(tokens)
  measured["shuffled"] = {
    kind: descriptor_quality_lib.shuffled_descriptors(final[kind], rng)
    for kind in ENTITY_TYPES
  }
  result["retrieval"] = {
    name: probe.measure(stage_tokens) for name, stage_tokens in measured.items()
  }
  return result


def run_quality(
  config: ml_collections.ConfigDict,
  dataset: Dataset,
  workdir: pathlib.Path,
) -> dict[str, Any]:
  """`descriptor_quality` of a workdir whose FACE stages have finished."""
  parts = face_stages.load_face_parts(config, dataset)
  tokens = describe_stages(config, parts, workdir)
  quality = descriptor_quality(config, dataset, parts, workdir, tokens)
  return {"after": list(tokens)[-1], **quality}


def run_descriptors(
  config: ml_collections.ConfigDict,
  dataset: Dataset,
  stage_dir: pathlib.Path,
  writer: MetricWriter,
) -> dict[str, Any]:
  """Exports the final descriptors and measures their quality.

  Args:
    config: the resolved experiment config.
    dataset: the dataset.
    stage_dir: `<workdir>/descriptors`.
    writer: unused (the results go to metrics.json).

  Returns:
    {"after": the FACE stage described, "files", "num_words",
    "vocabulary_size", "distinct_tokens", and the `descriptor_quality`
    entries "usage", "stability", "retrieval"}.
  """
  del writer  # One result per run, kept in metrics.json.
  workdir = stage_dir.parent
  parts = face_stages.load_face_parts(config, dataset)
  tokens = describe_stages(config, parts, workdir)
  after = list(tokens)[-1]
  if parallel.is_main_process():
    write_descriptors(stage_dir, parts.vocabulary.words, tokens[after], dataset)
  quality = descriptor_quality(config, dataset, parts, workdir, tokens)
  result = {
    "after": after,
    "files": [JSONL_FILE, TSV_FILE],
    "num_words": config.face.num_words,
    "vocabulary_size": len(parts.vocabulary),
    "distinct_tokens": quality["usage"]["all"]["distinct_tokens"],
    **quality,
  }
  for kind in ENTITY_TYPES:
    logging.info(
      "descriptors of %s 0: %s",
      kind,
      ", ".join(parts.vocabulary.words[i] for i in tokens[after][kind][0]),
    )
  usage = quality["usage"]["all"]
  logging.info(
    "descriptor usage: %d distinct tokens, perplexity %.1f; most used %s",
    usage["distinct_tokens"],
    usage["perplexity"],
    ", ".join(f"{word} ({count})" for word, count in usage["most_used"][:5]),
  )
  if "stability" in quality:
    logging.info("descriptor stability, map -> align: %s", quality["stability"])
  for name, scores in quality.get("retrieval", {}).items():
    logging.info("descriptor retrieval, %s: %s", name, scores)
  return result


def format_quality(quality: dict[str, Any]) -> str:
  """A readable summary of `run_quality` (or of the descriptors stage)."""
  lines = [f"Descriptors after {quality['after']}:"]
  # Runs of earlier versions recorded retrieval only.
  for kind, usage in quality.get("usage", {}).items():
    most_used = ", ".join(f"{w} ({c})" for w, c in usage["most_used"][:10])
    lines.append(
      f"  usage, {kind}: {usage['distinct_tokens']} distinct tokens, "
      f"perplexity {usage['perplexity']:.1f}; most used: {most_used}"
    )
  for kind, share in quality.get("stability", {}).items():
    lines.append(f"  stability map -> align, {kind}: {share:.3f}")
  for name, scores in quality.get("retrieval", {}).items():
    for kind, entry in scores.items():
      lines.append(
        f"  retrieval {name:>8}, {kind}: top-1 {entry['top1']:.3f}, "
        f"top-10 {entry['top10']:.3f} ({entry['entities']} {kind}s)"
      )
  if "retrieval" not in quality:
    lines.append("  retrieval: not measured (the dataset has no texts)")
  return "\n".join(lines)
