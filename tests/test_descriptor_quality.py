"""Codebook usage, stability and the shuffled floor on hand-made cases."""

import math

import numpy as np
import pytest

from face_jax.evaluation import descriptor_quality

WORDS = ("drama", "war", "music", "crime", "family")


def test_codebook_usage_counts_perplexity_and_order():
  # drama 3 times, war 2, music 1; crime and family unused.
  tokens = np.array([[0, 1], [0, 2], [1, 0]])
  usage = descriptor_quality.codebook_usage(tokens, WORDS, top=5)
  assert usage["distinct_tokens"] == 3
  entropy = -(
    3 / 6 * math.log(3 / 6) + 2 / 6 * math.log(2 / 6) + 1 / 6 * math.log(1 / 6)
  )
  assert usage["perplexity"] == pytest.approx(math.exp(entropy))
  assert usage["most_used"] == [["drama", 3], ["war", 2], ["music", 1]]
  assert descriptor_quality.codebook_usage(tokens, WORDS, top=1)[
    "most_used"
  ] == [["drama", 3]]


def test_perplexity_is_the_number_of_equally_used_tokens():
  every_word_once = np.arange(4).reshape(2, 2)
  usage = descriptor_quality.codebook_usage(every_word_once, WORDS)
  assert usage["perplexity"] == pytest.approx(4.0)
  # Equal counts keep the vocabulary order.
  assert [word for word, _ in usage["most_used"]] == list(WORDS[:4])
  one_word = np.zeros((3, 1), np.int32)
  assert descriptor_quality.codebook_usage(one_word, WORDS)[
    "perplexity"
  ] == pytest.approx(1.0)
  empty = descriptor_quality.codebook_usage(np.zeros((0, 2), int), WORDS)
  assert empty == {"distinct_tokens": 0, "perplexity": 0.0, "most_used": []}


def test_distinct_sets_ignore_word_order():
  tokens = np.array([[0, 1, 2], [2, 0, 1], [0, 1, 3], [1, 0, 2]])
  # Rows 0, 1 and 3 hold the same three words; row 2 differs in one.
  assert descriptor_quality.distinct_sets(tokens) == 2
  assert descriptor_quality.distinct_sets(np.tile([4, 3], (5, 1))) == 1
  assert descriptor_quality.distinct_sets(np.zeros((0, 3), int)) == 0


def test_stability_ignores_order_and_averages_over_entities():
  before = np.array([[0, 1, 2], [2, 3, 4]])
  after = np.array([[2, 0, 1], [2, 0, 1]])
  # Entity 0 keeps all three words, entity 1 keeps one of three.
  assert descriptor_quality.stability(before, after) == pytest.approx(
    (3 / 3 + 1 / 3) / 2
  )
  assert descriptor_quality.stability(before, before) == 1.0
  assert descriptor_quality.stability(before, before + 5) == 0.0
  with pytest.raises(ValueError, match="differ"):
    descriptor_quality.stability(before, after[:1])


def test_shuffled_descriptors_permute_whole_rows_with_a_seed():
  tokens = np.arange(40).reshape(20, 2)
  shuffled = descriptor_quality.shuffled_descriptors(
    tokens, np.random.default_rng(3)
  )
  order = np.random.default_rng(3).permutation(20)
  np.testing.assert_array_equal(shuffled, tokens[order])
  # The same rows, each intact, in another order.
  assert sorted(map(tuple, shuffled)) == sorted(map(tuple, tokens))
  assert not np.array_equal(shuffled, tokens)
