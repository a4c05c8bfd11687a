"""Profile embeddings: every user and item text through the frozen LLM.

Texts are encoded in fixed-size batches, longest first, each padded to the
smallest of a few length buckets that fits it, so the jitted encoder
compiles once per bucket instead of once per batch. Results are cached in the
workdir under a key of the model's fingerprint, max_length and the texts, and
reused while those stay the same.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import tempfile
from collections.abc import Sequence

import jax
import numpy as np
import tqdm
from absl import logging

from face_jax import parallel
from face_jax.llm.model import LLM

# Padded lengths of batches; max_length closes the list. Steps of 16 keep
# padding near a fifth of the tokens for profile-like texts, and only the
# lengths a run's texts reach are compiled (about six for typical profiles).
DEFAULT_BUCKETS = (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)
CACHE_FOLDER = "llm_cache"


def length_buckets(
  max_length: int, buckets: Sequence[int] = DEFAULT_BUCKETS
) -> tuple[int, ...]:
  """The bucket lengths used for `max_length`: those below it, then it."""
  return (*sorted(b for b in set(buckets) if b < max_length), max_length)


@functools.partial(jax.jit, static_argnums=0)
def _encode_batch(llm: LLM, params, input_ids, mask):
  # `llm` is static (hashed by identity), so the compiled encoder is reused
  # across calls for the same model.
  return llm.encode_ids(params, input_ids, mask)


def encode_texts(
  llm: LLM,
  texts: Sequence[str],
  *,
  batch_size: int,
  max_length: int,
  buckets: Sequence[int] = DEFAULT_BUCKETS,
  progress: bool = True,
  description: str = "encoding texts",
) -> np.ndarray:
  """Pooled, L2-normalised embeddings of texts.

  Args:
    llm: the loaded LLM.
    texts: the texts, any lengths; longer ones are truncated to max_length
      tokens.
    batch_size: texts per compiled batch (the last batch is padded).
    max_length: token budget per text, special tokens included.
    buckets: padded lengths to choose from (see `length_buckets`).
    progress: show a progress bar.
    description: label of the progress bar.

  Returns:
    [len(texts), hidden] float32, in the order of `texts`.
  """
  result = np.zeros((len(texts), llm.info.hidden_size), np.float32)
  if not texts:
    return result
  ids, mask = llm.tokenize(texts, max_length)
  lengths = mask.sum(axis=1)
  # Longest first: similar lengths share a batch, and the largest bucket
  # compiles at the start rather than after a long run.
  order = np.argsort(-lengths, kind="stable")
  sizes = length_buckets(max_length, buckets)

  def padded_batch(rows):
    need = max(int(lengths[rows].max()), 1)
    width = next(size for size in sizes if size >= need)
    batch_ids = np.full((batch_size, width), llm.info.pad_id, np.int32)
    batch_mask = np.zeros((batch_size, width), np.int32)
    count, filled = len(rows), min(width, ids.shape[1])
    batch_ids[:count, :filled] = ids[rows, :filled]
    batch_mask[:count, :filled] = mask[rows, :filled]
    return batch_ids, batch_mask

  bar = tqdm.tqdm(
    total=len(texts), desc=description, unit="text", disable=not progress
  )
  pending = None
  with bar:
    for start in range(0, len(texts), batch_size):
      rows = order[start : start + batch_size]
      # Dispatch this batch before collecting the previous one, so the
      # host pads the next batch while the device computes.
      running = (rows, _encode_batch(llm, llm.params, *padded_batch(rows)))
      if pending is not None:
        done_rows, done = pending
        result[done_rows] = np.asarray(done)[: len(done_rows)]
        bar.update(len(done_rows))
      pending = running
    done_rows, done = pending
    result[done_rows] = np.asarray(done)[: len(done_rows)]
    bar.update(len(done_rows))
  return result


def cache_key(llm: LLM, texts: Sequence[str], max_length: int) -> str:
  """Hex digest of the model fingerprint, max_length and the texts."""
  digest = hashlib.sha256()
  digest.update(f"{llm.info.fingerprint}\0{max_length}\0{len(texts)}".encode())
  for text in texts:
    digest.update(text.encode("utf-8", "surrogatepass") + b"\0")
  return digest.hexdigest()


def _atomic_save(path: pathlib.Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  descriptor, temporary = tempfile.mkstemp(
    dir=path.parent, prefix=path.name, suffix=".tmp"
  )
  try:
    with os.fdopen(descriptor, "wb") as f:
      np.save(f, array)
    os.replace(temporary, path)
  except BaseException:
    os.unlink(temporary)
    raise


def profile_embeddings(
  llm: LLM,
  texts: Sequence[str],
  *,
  workdir: str | os.PathLike,
  name: str,
  batch_size: int,
  max_length: int,
  progress: bool = True,
) -> np.ndarray:
  """Embeddings of profile texts, from the workdir cache when valid.

  Args:
    llm: the loaded LLM.
    texts: one profile per entity, in id order.
    workdir: the experiment's workdir; the cache lives in its llm_cache/.
    name: what the texts are ("user", "item"), for the file name and logs.
    batch_size: texts per batch (config.llm.batch_size).
    max_length: token budget per text (config.llm.max_length).
    progress: show a progress bar while encoding.

  Returns:
    [len(texts), hidden] float32, L2-normalised rows.
  """
  key = cache_key(llm, texts, max_length)
  path = pathlib.Path(workdir) / CACHE_FOLDER / f"{name}-{key[:20]}.npy"
  if path.is_file():
    cached = np.load(path)
    if cached.shape == (len(texts), llm.info.hidden_size):
      logging.info("Reusing %s profile embeddings from %s", name, path)
      return cached
    logging.warning("Ignoring %s: shape %s is stale.", path, cached.shape)
  embeddings = encode_texts(
    llm,
    texts,
    batch_size=batch_size,
    max_length=max_length,
    progress=progress,
    description=f"{name} profiles",
  )
  if parallel.is_main_process():
    # Every process encoded the same texts; one copy of the cache is kept.
    _atomic_save(path, embeddings)
    logging.info("Wrote %s profile embeddings to %s", name, path)
  return embeddings
