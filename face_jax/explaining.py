"""Explanations of a finished run: an entity's words and recommendations.

For a user: the descriptor words and profile text, then the top-K items of
a full ranking by the trained backbone (the one after the last FACE stage,
scores by dot product, the user's train items excluded and equal scores
ranked by item id, as in evaluation), each with its own descriptors, the
words it shares with the user and whether it is among the user's held-out
test (or validation) items. For an item: its words, profile text and how
many users it has in train.

`python -m face_jax.explain` prints these; the notebook shows them too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from face_jax import data, parallel
from face_jax.data import Dataset
from face_jax.runs import FinishedRun, RunError
from face_jax.training import face_stages


def _items_by_user(pairs: np.ndarray, num_users: int) -> list[np.ndarray]:
  """[n, 2] (user, item) pairs sorted by user -> each user's items."""
  bounds = np.searchsorted(pairs[:, 0], np.arange(num_users + 1))
  return [pairs[bounds[u] : bounds[u + 1], 1] for u in range(num_users)]


def shared_words(first: Sequence[str], second: Sequence[str]) -> list[str]:
  """The words of `first` that `second` also has, in `first`'s order."""
  others = set(second)
  return [word for word in first if word in others]


def top_items(
  user_vector: np.ndarray,
  item_table: np.ndarray,
  excluded: np.ndarray,
  top_k: int,
) -> tuple[np.ndarray, np.ndarray]:
  """The top_k items by dot product, `excluded` left out, ties by id.

  Args:
    user_vector: [d] the user's final embedding.
    item_table: [num_items, d] the items' final embeddings.
    excluded: item ids never recommended (the user's train items).
    top_k: how many items.

  Returns:
    (items [k], scores [k]) best first; k = top_k or fewer when fewer
    items are left.
  """
  scores = item_table @ user_vector
  allowed = np.ones(len(scores), bool)
  allowed[excluded] = False
  candidates = np.flatnonzero(allowed)
  # A stable sort of the negated scores ranks equal scores by item id.
  order = np.argsort(-scores[candidates], kind="stable")[:top_k]
  chosen = candidates[order]
  return chosen, scores[chosen]


class Explainer:
  """Explains the users and items of a finished run.

  Building one loads the dataset. The first user explanation also loads
  the LLM's vocabulary (the restore needs the FACE parameters' shapes) and
  the best params of the last FACE stage, and computes every user's and
  item's final embedding once; items are explained without them.

  Args:
    run: the finished run (`face_jax.runs.open_run`).
    dataset: its dataset; None loads `run.config.data`.

  Raises:
    RunError: the dataset does not match the run's descriptors.
    DataError: the dataset cannot be loaded.
  """

  def __init__(self, run: FinishedRun, dataset: Dataset | None = None):
    if dataset is None:
      dataset = data.load_dataset(run.config.data)
    counts = {kind: len(run.descriptors[kind]) for kind in ("user", "item")}
    if counts != {"user": dataset.num_users, "item": dataset.num_items}:
      raise RunError(
        f"Dataset {dataset.name} has {dataset.num_users} users and "
        f"{dataset.num_items} items but the run described {counts['user']} "
        f"and {counts['item']}; use the dataset the run was trained on."
      )
    self.run = run
    self.dataset = dataset
    self._tables: tuple[np.ndarray, np.ndarray] | None = None
    self._train = _items_by_user(dataset.train, dataset.num_users)
    self._valid = _items_by_user(dataset.valid, dataset.num_users)
    self._test = _items_by_user(dataset.test, dataset.num_users)
    self._item_train_users = np.bincount(
      dataset.train[:, 1], minlength=dataset.num_items
    )

  def _embeddings(self) -> tuple[np.ndarray, np.ndarray]:
    """([num_users, d], [num_items, d]) final embeddings, computed once."""
    if self._tables is None:
      run = self.run
      parts = face_stages.load_face_parts(run.config, self.dataset)
      params = face_stages.restore_face_params(
        run.config, parts, run.workdir / run.stage
      )
      users, items = jax.jit(parts.backbone.embed)(
        params[face_stages.BACKBONE], parts.graph
      )
      self._tables = parallel.to_host((users, items))
    return self._tables

  @property
  def user_table(self) -> np.ndarray:
    """[num_users, d] users' embeddings by the trained backbone."""
    return self._embeddings()[0]

  @property
  def item_table(self) -> np.ndarray:
    """[num_items, d] items' embeddings by the trained backbone."""
    return self._embeddings()[1]

  def user(self, user: int, top_k: int = 10) -> dict[str, Any]:
    """The explanation of one user.

    Args:
      user: user id (0-based, as in descriptors.jsonl).
      top_k: how many recommended items.

    Returns:
      {"type": "user", "id", "stage", "words", "text", "train_items",
      "test_items": the held-out test item ids, "hits": recommended items
      in the test set, "recommendations": [{"rank" (1-based), "item",
      "score", "words", "text", "shared_words", "in_test", "in_valid"}]}.

    Raises:
      RunError: unknown user or top_k below 1.
    """
    if top_k < 1:
      raise RunError(f"top_k={top_k}; ask for at least one item.")
    record = self.run.record("user", user)
    items, scores = top_items(
      self.user_table[user], self.item_table, self._train[user], top_k
    )
    test, valid = set(self._test[user].tolist()), set(self._valid[user])
    recommendations = []
    for rank, (item, score) in enumerate(zip(items, scores, strict=True)):
      described = self.run.record("item", int(item))
      recommendations.append(
        {
          "rank": rank + 1,
          "item": int(item),
          "score": float(score),
          "words": described["words"],
          "text": described["text"],
          "shared_words": shared_words(record["words"], described["words"]),
          "in_test": int(item) in test,
          "in_valid": int(item) in valid,
        }
      )
    return {
      "type": "user",
      "id": user,
      "stage": self.run.stage,
      "words": record["words"],
      "text": record["text"],
      "train_items": len(self._train[user]),
      "test_items": sorted(test),
      "hits": sum(entry["in_test"] for entry in recommendations),
      "recommendations": recommendations,
    }

  def item(self, item: int) -> dict[str, Any]:
    """The explanation of one item: {"type": "item", "id", "stage",
    "words", "text", "train_users"}.

    Raises:
      RunError: unknown item.
    """
    record = self.run.record("item", item)
    return {
      "type": "item",
      "id": item,
      "stage": self.run.stage,
      "words": record["words"],
      "text": record["text"],
      "train_users": int(self._item_train_users[item]),
    }


def describe_entity(run: FinishedRun, kind: str, entity: int) -> str:
  """One line: "user 3 (align): drama, war, ..." from descriptors.jsonl."""
  record = run.record(kind, entity)
  return f"{kind} {entity} ({run.stage}): {', '.join(record['words'])}"


def _short(text: str | None, limit: int = 160) -> str:
  if not text:
    return "(no profile text)"
  text = " ".join(text.split())
  return text if len(text) <= limit else text[: limit - 3] + "..."


def format_explanation(explanation: dict[str, Any]) -> str:
  """A readable, multi-line rendering of `Explainer.user` or `.item`."""
  kind, entity = explanation["type"], explanation["id"]
  lines = [
    f"{kind} {entity}, descriptors after {explanation['stage']}: "
    f"{', '.join(explanation['words'])}",
    f"  profile: {_short(explanation['text'])}",
  ]
  if kind == "item":
    lines.append(f"  train users: {explanation['train_users']}")
    return "\n".join(lines)
  recommendations = explanation["recommendations"]
  lines.append(
    f"  {explanation['train_items']} train items (excluded), "
    f"{len(explanation['test_items'])} held-out test items; "
    f"{explanation['hits']} of the top {len(recommendations)} are among them"
  )
  for entry in recommendations:
    held_out = ""
    if entry["in_test"]:
      held_out = "  [held-out test item]"
    elif entry["in_valid"]:
      held_out = "  [validation item]"
    shared = ", ".join(entry["shared_words"]) or "-"
    lines += [
      f"  {entry['rank']:>3}. item {entry['item']} "
      f"(score {entry['score']:.3f}){held_out}",
      f"       words: {', '.join(entry['words'])}",
      f"       shared with the user: {shared}",
      f"       profile: {_short(entry['text'], 120)}",
    ]
  return "\n".join(lines)
