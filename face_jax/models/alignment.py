"""Alignment of quantised words with text: back-mapping, sentences, InfoNCE.

The align stage turns each entity's quantised words back into the LLM's
input-embedding space, wraps them in a prompt, lets the frozen LLM encode
the sentence (elsewhere) and pulls the result towards the LLM's embedding of
the entity's profile text with InfoNCE.

This module takes token ids and the frozen token table as plain inputs so
that it does not depend on any LLM code; `sentence_token_ids` collects the
ids from a Hugging Face tokenizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Entity types, indexing `SentenceLayout` rows.
USER = 0
ITEM = 1

USER_PROMPT = "The user and his likes can be described as the following words:"

# Softmax temperature of the alignment InfoNCE.
ALIGN_TEMPERATURE = 0.02


class AlignmentError(ValueError):
  """Token ids or shapes that cannot make a sentence."""


def item_prompt(item_noun: str) -> str:
  """The item prompt, e.g. "The game attracts those who can be ..."."""
  return (
    f"The {item_noun} attracts those who can be described as the following "
    "words:"
  )


def stacked_entity_types(batch_size: int) -> np.ndarray:
  """Types of the rows of a stacked (users, positives, negatives) batch.

  Args:
    batch_size: B, triples in the batch.

  Returns:
    [3 * B] int32: USER for rows 0..B-1, ITEM for rows B..3B-1.
  """
  return np.repeat(np.array([USER, ITEM, ITEM], np.int32), batch_size)


def back_to_token_space(
  z_q: jax.Array, kernel: jax.Array, bias: jax.Array
) -> jax.Array:
  """Undoes the codebook map: (z_q - bias) @ pinv(kernel).

  The pseudo-inverse and the bias are constants for autodiff, so gradients
  reach z_q only, never the map. When word_dim >= token_dim and the kernel
  has full rank this recovers a mapped token row exactly; otherwise it is
  the minimum-norm least-squares preimage.

  Args:
    z_q: [n, W, word_dim] quantised words (the straight-through output).
    kernel: [token_dim, word_dim] codebook map weight (flax Dense layout).
    bias: [word_dim] codebook map bias.

  Returns:
    [n, W, token_dim] word embeddings in the LLM's input space.
  """
  inverse = lax.stop_gradient(jnp.linalg.pinv(kernel))
  return (z_q - lax.stop_gradient(bias)) @ inverse


@flax.struct.dataclass
class SentenceLayout:
  """Where every position of the fixed-length sentences comes from.

  Row USER describes user sentences, row ITEM item sentences. A position is
  a word slot (word_slot >= 0), a fixed token (prefix, prompt, comma,
  suffix) or right padding (mask 0, filled with the pad token).

  Attributes:
    token_ids: [2, T] int32 token of each fixed position (pad elsewhere).
    word_slot: [2, T] int32 word index at word positions, -1 elsewhere.
    mask: [2, T] int32 attention mask, 1 on real positions.
    num_words: W, word slots per sentence (static).
  """

  token_ids: np.ndarray
  word_slot: np.ndarray
  mask: np.ndarray
  num_words: int = flax.struct.field(pytree_node=False)

  @property
  def length(self) -> int:
    return self.token_ids.shape[-1]


def _layout_row(
  prompt_ids: Sequence[int],
  comma_id: int,
  num_words: int,
  prefix_ids: Sequence[int],
  suffix_ids: Sequence[int],
) -> tuple[list[int], list[int]]:
  ids = list(prefix_ids) + list(prompt_ids)
  slots = [-1] * len(ids)
  for word in range(num_words):
    if word:
      ids.append(comma_id)
      slots.append(-1)
    ids.append(-1)
    slots.append(word)
  ids += list(suffix_ids)
  slots += [-1] * len(suffix_ids)
  return ids, slots


def make_sentence_layout(
  user_prompt_ids: Sequence[int],
  item_prompt_ids: Sequence[int],
  comma_id: int,
  num_words: int,
  *,
  prefix_ids: Sequence[int] = (),
  suffix_ids: Sequence[int] = (),
  pad_id: int = 0,
  length: int | None = None,
) -> SentenceLayout:
  """Lays out prefix + prompt + w1 , w2 , ... , wW + suffix per entity type.

  Args:
    user_prompt_ids: token ids of the user prompt, without special tokens.
    item_prompt_ids: token ids of the item prompt, without special tokens.
    comma_id: id of the comma token placed between consecutive words.
    num_words: W.
    prefix_ids: ids before the prompt ([CLS] for BERT, BOS and an
      instruction for decoder LLMs).
    suffix_ids: ids after the last word ([SEP] for BERT, an EOS or pad
      token for decoder LLMs that pool the last token).
    pad_id: token filling the right padding.
    length: T, positions per sentence; defaults to the longer sentence.

  Returns:
    The `SentenceLayout`.
  """
  if num_words < 1:
    raise AlignmentError(f"num_words={num_words}; it must be at least 1.")
  rows = [
    _layout_row(prompt, comma_id, num_words, prefix_ids, suffix_ids)
    for prompt in (user_prompt_ids, item_prompt_ids)
  ]
  needed = max(len(ids) for ids, _ in rows)
  length = needed if length is None else length
  if length < needed:
    raise AlignmentError(
      f"Sentence length {length} is shorter than the {needed} positions the "
      "prompts and words need; raise the length or shorten the prompt."
    )
  token_ids = np.full((2, length), pad_id, np.int32)
  word_slot = np.full((2, length), -1, np.int32)
  mask = np.zeros((2, length), np.int32)
  for row, (ids, slots) in enumerate(rows):
    size = len(ids)
    token_ids[row, :size] = np.where(np.array(slots) >= 0, pad_id, ids)
    word_slot[row, :size] = slots
    mask[row, :size] = 1
  return SentenceLayout(token_ids, word_slot, mask, num_words)


def build_sentences(
  words: jax.Array,
  entity_type: jax.Array,
  layout: SentenceLayout,
  token_table: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Input embeddings of each entity's sentence for the frozen LLM.

  Args:
    words: [n, W, h] word embeddings (from `back_to_token_space`).
    entity_type: [n] int32, USER or ITEM per row (`stacked_entity_types`).
    layout: the `SentenceLayout`, W word slots per row.
    token_table: [vocab, h] the LLM's full frozen input-embedding table.

  Returns:
    (embeddings [n, T, h], attention mask [n, T] int32), right-padded.
  """
  if words.shape[1] != layout.num_words:
    raise AlignmentError(
      f"Got {words.shape[1]} words per entity but the layout has "
      f"{layout.num_words} word slots; make the layout with num_words="
      f"{words.shape[1]}."
    )
  fixed = lax.stop_gradient(token_table)[layout.token_ids]  # [2, T, h]
  slot = jnp.asarray(layout.word_slot)[entity_type]  # [n, T]
  placed = jnp.take_along_axis(words, jnp.maximum(slot, 0)[..., None], axis=1)
  embeddings = jnp.where(slot[..., None] >= 0, placed, fixed[entity_type])
  return embeddings, jnp.asarray(layout.mask)[entity_type]


@dataclasses.dataclass(frozen=True)
class SentenceIds:
  """Token ids for `make_sentence_layout`, from a real tokenizer."""

  user_prompt_ids: tuple[int, ...]
  item_prompt_ids: tuple[int, ...]
  comma_id: int
  prefix_ids: tuple[int, ...]
  suffix_ids: tuple[int, ...]
  pad_id: int

  def layout(self, num_words: int, length: int | None = None):
    """The `SentenceLayout` of these ids for W = num_words."""
    return make_sentence_layout(
      self.user_prompt_ids,
      self.item_prompt_ids,
      self.comma_id,
      num_words,
      prefix_ids=self.prefix_ids,
      suffix_ids=self.suffix_ids,
      pad_id=self.pad_id,
      length=length,
    )


def _split_special(tokenizer: Any, text: str) -> tuple[list, list, list]:
  """(prefix, body, suffix): the special tokens the tokenizer adds."""
  body = tokenizer(text, add_special_tokens=False)["input_ids"]
  full = tokenizer(text, add_special_tokens=True)["input_ids"]
  for start in range(len(full) - len(body) + 1):
    if full[start : start + len(body)] == body:
      return full[:start], body, full[start + len(body) :]
  raise AlignmentError(
    f"The tokenizer encodes {text!r} differently with and without special "
    "tokens; pass the ids to make_sentence_layout by hand."
  )


def sentence_token_ids(
  tokenizer: Any,
  item_noun: str,
  *,
  instruction: str = "",
  end_token: str = "",
) -> SentenceIds:
  """Collects the sentence's token ids from a Hugging Face tokenizer.

  The special tokens are those the tokenizer itself adds around a text
  ([CLS] ... [SEP] for BERT, BOS for Llama, none for Qwen2).

  Args:
    tokenizer: a `transformers` tokenizer.
    item_noun: noun of the item prompt ("game", "book", ...).
    instruction: text placed after the leading special tokens and before
      the prompt (an instruction prefix for instruction-tuned embedders).
    end_token: "" for nothing more, or "eos" / "pad" to append that token
      after the words and any trailing special tokens (for last-token
      pooling).

  Returns:
    The `SentenceIds`.
  """
  end_tokens = {
    "": None,
    "eos": tokenizer.eos_token_id,
    "pad": tokenizer.pad_token_id,
  }
  if end_token not in end_tokens:
    raise AlignmentError(
      f"Unknown end_token {end_token!r}; use one of {sorted(end_tokens)}."
    )
  prefix, user_ids, suffix = _split_special(tokenizer, USER_PROMPT)
  _, item_ids, _ = _split_special(tokenizer, item_prompt(item_noun))
  comma = tokenizer(",", add_special_tokens=False)["input_ids"]
  if len(comma) != 1:
    raise AlignmentError(
      f"The tokenizer splits ',' into {comma}; a single comma token is "
      "needed between words."
    )
  if instruction:
    prefix += tokenizer(instruction, add_special_tokens=False)["input_ids"]
  if end_token:
    end_id = end_tokens[end_token]
    if end_id is None:
      raise AlignmentError(
        f"The tokenizer has no {end_token} token; set end_token to ''."
      )
    suffix = [*suffix, end_id]
  pad_id = tokenizer.pad_token_id
  return SentenceIds(
    user_prompt_ids=tuple(user_ids),
    item_prompt_ids=tuple(item_ids),
    comma_id=comma[0],
    prefix_ids=tuple(prefix),
    suffix_ids=tuple(suffix),
    pad_id=0 if pad_id is None else pad_id,
  )


def info_nce(
  collab: jax.Array,
  profile: jax.Array,
  temperature: float = ALIGN_TEMPERATURE,
) -> jax.Array:
  """InfoNCE of each row's collaborative sentence against its profile.

  logits = collab @ profile^T / temperature, cross-entropy with row i's
  label i, mean over rows. Both inputs are expected L2-normalised (the LLM
  encoder normalises its pooled outputs), so logits are cosines / T.

  Args:
    collab: [n, h] LLM embeddings of the entities' word sentences.
    profile: [n, h] LLM embeddings of the same entities' profiles.
    temperature: softmax temperature (0.02).

  Returns:
    Scalar loss.
  """
  logits = (collab @ profile.T) / temperature
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.diagonal(log_probs))
