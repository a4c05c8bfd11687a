"""How good the descriptors are, beyond retrieval: usage and stability.

Pure numpy over descriptor token indices ([entities, W] int arrays of
vocabulary indices, as `face_jax.descriptors.describe_all` returns them):

- codebook usage: how many distinct tokens all entities use together, the
  perplexity of the token-usage distribution (exp of its entropy: the
  number of equally used tokens that would be as spread out; W * entities
  when no two words repeat, 1 when every word is the same token) and the
  most used tokens with their counts; how many different descriptor sets
  the entities have;
- stability: the share of an entity's words still among its words after a
  later stage (order ignored), averaged over the entities;
- the shuffled floor of profile retrieval: every entity gets the
  descriptors of another entity of its type (a seeded permutation), so
  the floor uses exactly the real words, only not the entity's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def codebook_usage(
  tokens: np.ndarray, words: Sequence[str], top: int = 20
) -> dict[str, Any]:
  """Distinct tokens, usage perplexity and the most used words.

  Args:
    tokens: [entities, W] vocabulary indices.
    words: the vocabulary's words, by index.
    top: how many of the most used words to list.

  Returns:
    {"distinct_tokens": int, "perplexity": float, "most_used": [[word,
    count], ...]} with the most used first (equal counts: lower index
    first).
  """
  counts = np.bincount(np.ravel(tokens), minlength=len(words))
  used = counts[counts > 0]
  if used.size == 0:
    return {"distinct_tokens": 0, "perplexity": 0.0, "most_used": []}
  share = used / used.sum()
  entropy = -float(np.sum(share * np.log(share)))
  # A stable sort of the negated counts keeps equal counts in index order.
  order = np.argsort(-counts, kind="stable")[: min(top, used.size)]
  return {
    "distinct_tokens": int(used.size),
    "perplexity": float(np.exp(entropy)),
    "most_used": [[words[index], int(counts[index])] for index in order],
  }


def distinct_sets(tokens: np.ndarray) -> int:
  """How many different descriptor sets [entities, W] indices hold.

  Order is ignored (the same W words in another order are one set): 1
  means every entity is described by the same words.
  """
  tokens = np.asarray(tokens)
  if tokens.shape[0] == 0:
    return 0
  return len(np.unique(np.sort(tokens, axis=1), axis=0))


def stability(before: np.ndarray, after: np.ndarray) -> float:
  """Mean share of an entity's words kept from `before` to `after`.

  Args:
    before: [entities, W] vocabulary indices (for example after map).
    after: [entities, W] vocabulary indices of the same entities later.

  Returns:
    The mean over entities of |words before ∩ words after| / W.

  Raises:
    ValueError: the shapes differ.
  """
  if before.shape != after.shape:
    raise ValueError(
      f"Descriptor shapes {before.shape} and {after.shape} differ; compare "
      "the same entities with the same number of words."
    )
  if before.size == 0:
    return 0.0
  # Words of an entity are distinct, so membership counts the overlap.
  kept = (before[:, :, None] == after[:, None, :]).any(axis=2)
  return float(kept.mean())


def shuffled_descriptors(
  tokens: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
  """The rows of `tokens` in a seeded random order: the retrieval floor.

  Args:
    tokens: [entities, W] descriptors of one entity type.
    rng: the generator of the permutation.

  Returns:
    [entities, W]: row i is the descriptors of entity permutation[i].
  """
  return tokens[rng.permutation(len(tokens))]
