"""The descriptor vocabulary: LLM tokens that are frequent English words.

A token qualifies when it is a whole lowercase alphabetic word of the
tokenizer (WordPiece: not a "##" continuation; byte-level BPE and
sentencepiece: it carries the word-start marker "Ġ" or "▁") and that word is
among the first `size` entries of a frequency-ordered list of English nouns
and adjectives. The list is built in by default (see
face_jax/resources/NOTICE); a text file or the COCA frequency spreadsheet the
FACE authors used can replace it.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.resources
import pathlib
import re
from collections.abc import Mapping, Sequence

import numpy as np
from absl import logging

from face_jax.llm import xlsx

BUILTIN_WORD_LIST = "english_nouns_adjectives.txt"

# Tokenizer scheme -> marker that opens a token starting a word ("" for
# WordPiece, where continuation pieces are marked instead).
WORD_START = {"wordpiece": "", "byte_bpe": "Ġ", "sentencepiece": "▁"}
_CONTINUATION = "##"
_WORD = re.compile(r"[a-z]+")

# COCA part-of-speech codes kept, as the FACE authors keep them: nouns and
# adjectives.
COCA_POS = ("n", "j")


class VocabularyError(ValueError):
  """The word list or the tokenizer vocabulary cannot be used."""


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Descriptor tokens, sorted by token id.

  Attributes:
    token_ids: [num_tokens] int32 token ids, ascending.
    words: the word each token spells, aligned with token_ids.
    whole_word_tokens: how many whole-word alphabetic tokens the tokenizer
      has before the word-list filter.
    list_size: how many words of the list were used.
  """

  token_ids: np.ndarray
  words: tuple[str, ...]
  whole_word_tokens: int
  list_size: int

  def __len__(self) -> int:
    return len(self.words)


def detect_scheme(vocab: Mapping[str, int]) -> str:
  """Guesses the tokenizer scheme from how its tokens are marked.

  The most common marker decides: "##" continuations (WordPiece), "Ġ" word
  starts (byte-level BPE) or "▁" word starts (sentencepiece).
  """
  counts = collections.Counter()
  for token in vocab:
    if token.startswith(_CONTINUATION):
      counts["wordpiece"] += 1
    elif token.startswith(WORD_START["byte_bpe"]):
      counts["byte_bpe"] += 1
    elif token.startswith(WORD_START["sentencepiece"]):
      counts["sentencepiece"] += 1
  if not counts:
    raise VocabularyError(
      "Cannot tell whole words in this tokenizer: no token starts with '##', "
      "'Ġ' or '▁'."
    )
  return counts.most_common(1)[0][0]


def whole_word_tokens(
  vocab: Mapping[str, int], scheme: str | None = None
) -> dict[int, str]:
  """Token id -> word, for tokens that are whole lowercase alphabetic words.

  Args:
    vocab: token string -> id, as `tokenizer.get_vocab()` gives it.
    scheme: "wordpiece", "byte_bpe" or "sentencepiece"; None to detect.
  """
  scheme = scheme or detect_scheme(vocab)
  if scheme not in WORD_START:
    raise VocabularyError(
      f"Unknown tokenizer scheme {scheme!r}; use one of {sorted(WORD_START)}."
    )
  marker = WORD_START[scheme]
  words = {}
  for token, token_id in vocab.items():
    if scheme == "wordpiece" and token.startswith(_CONTINUATION):
      continue
    if not token.startswith(marker):
      continue
    word = token[len(marker) :]
    if _WORD.fullmatch(word):
      words[int(token_id)] = word
  return words


def _unique(words) -> list[str]:
  return list(dict.fromkeys(words))


def builtin_word_list() -> list[str]:
  """The built-in frequency-ordered English noun and adjective list."""
  resource = importlib.resources.files("face_jax") / "resources"
  text = (resource / BUILTIN_WORD_LIST).read_text(encoding="utf-8")
  return _text_words(text)


def _text_words(text: str) -> list[str]:
  lines = (line.strip() for line in text.splitlines())
  return _unique(line for line in lines if line and not line.startswith("#"))


def _find_column(header: Sequence[str | None], names, path) -> int:
  lowered = [(cell or "").strip().lower() for cell in header]
  for name in names:
    if name in lowered:
      return lowered.index(name)
  raise VocabularyError(
    f"{path}: no {' or '.join(names)} column in the first row {header}; "
    "a COCA list needs 'word' (or 'lemma') and 'PoS' columns."
  )


def coca_word_list(path: str | pathlib.Path) -> list[str]:
  """Nouns and adjectives of a COCA frequency spreadsheet, in file order.

  As the FACE authors read it: cells are stripped, empty words dropped,
  "(word)" unwrapped, each word keeps only its first (most frequent)
  part of speech, and only nouns and adjectives remain.
  """
  rows = xlsx.read_first_sheet(path)
  if not rows:
    raise VocabularyError(f"{path}: the first sheet is empty.")
  word_column = _find_column(rows[0], ("word", "lemma"), path)
  pos_column = _find_column(rows[0], ("pos",), path)
  first_pos = {}
  for row in rows[1:]:
    cells = [*row, None, None]
    word = (cells[word_column] or "").strip()
    if word.startswith("(") and word.endswith(")"):
      word = word[1:-1]
    if word and word not in first_pos:
      first_pos[word] = (cells[pos_column] or "").strip().lower()
  return [word for word, pos in first_pos.items() if pos in COCA_POS]


def read_word_list(source: str) -> list[str]:
  """Reads a frequency-ordered word list.

  Args:
    source: "" for the built-in list; a path ending in .xlsx for a COCA
      spreadsheet; any other path for a text file with one word a line,
      most frequent first ("#" lines are comments). Words are matched
      exactly against the lowercase tokens.
  """
  if not source:
    return builtin_word_list()
  path = pathlib.Path(source).expanduser()
  if not path.is_file():
    raise VocabularyError(
      f"config.vocab.word_list={source!r} is not a file; give a text file "
      "(one word a line) or a COCA .xlsx, or '' for the built-in list."
    )
  if path.suffix.lower() == ".xlsx":
    return coca_word_list(path)
  return _text_words(path.read_text(encoding="utf-8"))


def build_vocabulary(
  vocab: Mapping[str, int],
  word_list: Sequence[str],
  size: int,
  scheme: str | None = None,
) -> Vocabulary:
  """Intersects the tokenizer's whole words with the list's first `size`.

  Args:
    vocab: token string -> id (`tokenizer.get_vocab()`).
    word_list: words, most frequent first.
    size: how many words of the list to use.
    scheme: tokenizer scheme; None to detect it.

  Returns:
    The `Vocabulary`, sorted by token id.
  """
  if size <= 0:
    raise VocabularyError(f"config.vocab.size={size}; it must be positive.")
  if size > len(word_list):
    logging.info(
      "config.vocab.size=%d but the word list has %d words; using them all.",
      size,
      len(word_list),
    )
  kept_words = set(word_list[:size])
  whole = whole_word_tokens(vocab, scheme)
  kept = sorted((i, w) for i, w in whole.items() if w in kept_words)
  if not kept:
    raise VocabularyError(
      "No tokenizer token is in the word list; check config.vocab.word_list."
    )
  return Vocabulary(
    token_ids=np.array([i for i, _ in kept], np.int32),
    words=tuple(w for _, w in kept),
    whole_word_tokens=len(whole),
    list_size=min(size, len(word_list)),
  )


def descriptor_vocabulary(tokenizer, config) -> Vocabulary:
  """The descriptor vocabulary of a tokenizer for the `vocab` config section.

  Args:
    tokenizer: a Hugging Face tokenizer (`LLM.tokenizer`).
    config: the `vocab` section (word_list, size).
  """
  return build_vocabulary(
    tokenizer.get_vocab(), read_word_list(config.word_list), config.size
  )
