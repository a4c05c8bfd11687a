"""The map and align stages: loss wiring, optimiser groups, batches.

That each stage's jitted step compiles once across steps is checked on the
steps of a real run, in test_stages_e2e.py.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _face_fixtures import (
  cache_folder,
  shared_compilation_cache,
  text_dataset,
  tiny_config,
  write_tiny_bert,
)

from face_jax.models import alignment
from face_jax.training import face_stages


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  with shared_compilation_cache(cache_folder(tmp_path_factory)):
    yield


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
  return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def config(bert_folder):
  return tiny_config(bert_folder)


@pytest.fixture(scope="module")
def dataset():
  return text_dataset()


@pytest.fixture(scope="module")
def parts(config, dataset):
  return face_stages.load_face_parts(config, dataset)


@pytest.fixture(scope="module")
def constants(config, parts, dataset, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("workdir")
  return face_stages.align_constants(config, parts, dataset, workdir)


# Jitted once per dropout setting; the LLM (hashed by identity) is static.
_alignment_loss = jax.jit(
  face_stages.alignment_loss,
  static_argnames=("llm", "llm_dropout", "temperature"),
)


def _state(config, parts):
  backbone_params = parts.backbone.init(jax.random.key(3))
  return face_stages.initial_map_state(config, parts, backbone_params)


def _torch_adam_step(param, grad, lr, weight_decay, state):
  """One torch.optim.Adam step in float64 (decay joins the gradient)."""
  b1, b2, eps = 0.9, 0.999, 1e-8
  step, first, second = state
  step += 1
  grad = grad + weight_decay * param
  first = b1 * first + (1 - b1) * grad
  second = b2 * second + (1 - b2) * grad**2
  update = (first / (1 - b1**step)) / (np.sqrt(second / (1 - b2**step)) + eps)
  return param - lr * update, (step, first, second)


def test_face_optimizer_groups_match_the_authors_param_groups(config):
  config = copy.deepcopy(config)
  # A large L2 weight makes the coupled decay visible in a few steps.
  config.model.reg_weight = 0.2
  rng = np.random.default_rng(0)
  params = {
    "backbone": {"user": rng.normal(size=(4, 3)).astype(np.float32)},
    "face": {"projection": {"kernel": rng.normal(size=(3,)).astype("f4")}},
  }
  optimizer = face_stages.face_optimizer(config)
  jax_params = jax.tree.map(jnp.asarray, params)
  opt_state = optimizer.init(jax_params)
  expected = jax.tree.map(lambda p: p.astype(np.float64), params)
  moments = jax.tree.map(lambda p: (0, 0.0 * p, 0.0 * p), expected)
  groups = {
    "backbone": (config.face.backbone_learning_rate, 0.4),
    "face": (config.face.learning_rate, 0.0),
  }
  for step in range(3):
    grads = jax.tree.map(
      lambda p, step=step: np.sin(p * (step + 1)).astype(np.float32), params
    )
    updates, opt_state = optimizer.update(
      jax.tree.map(jnp.asarray, grads), opt_state, jax_params
    )
    jax_params = optax.apply_updates(jax_params, updates)
    for group, (lr, decay) in groups.items():
      leaves, treedef = jax.tree.flatten(expected[group])
      new = [
        _torch_adam_step(p, g, lr, decay, m)
        for p, g, m in zip(
          leaves,
          jax.tree.leaves(grads[group]),
          treedef.flatten_up_to(moments[group]),
          strict=True,
        )
      ]
      expected[group] = treedef.unflatten([p for p, _ in new])
      moments[group] = treedef.unflatten([m for _, m in new])
  for group in groups:
    for got, want in zip(
      jax.tree.leaves(jax_params[group]),
      jax.tree.leaves(expected[group]),
      strict=True,
    ):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def _numpy_info_nce(collab, profile, temperature):
  logits = collab @ profile.T / temperature
  logits -= logits.max(axis=1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  return -np.mean(np.diag(log_probs))


def test_alignment_loss_matches_sentences_built_by_hand(
  config, parts, constants
):
  llm = parts.llm
  batch_size, words = 2, config.face.num_words
  face_params = _state(config, parts).params["face"]
  rng = np.random.default_rng(1)
  z_q = rng.normal(size=(3 * batch_size, words, config.face.word_dim))
  batch = {"user": np.array([5, 1]), "pos": np.array([2, 7]), "neg": [9, 3]}
  batch = {name: jnp.asarray(ids, jnp.int32) for name, ids in batch.items()}
  loss = _alignment_loss(
    llm,
    face_params,
    jnp.asarray(z_q, jnp.float32),
    batch,
    constants,
    jax.random.key(0),
    llm_dropout=False,
    temperature=0.02,
  )

  # The same sentences from their parts: [CLS] prompt w1 , w2 , ... [SEP],
  # the prompt by entity type, each sentence encoded alone (no padding).
  kernel = np.asarray(face_params["codebook_map"]["kernel"], np.float64)
  bias = np.asarray(face_params["codebook_map"]["bias"], np.float64)
  back = (z_q - bias) @ np.linalg.pinv(kernel)
  table = np.asarray(llm.token_table(llm.params))
  tokenizer = llm.tokenizer
  prompts = [alignment.USER_PROMPT, alignment.item_prompt("movie")]
  comma = table[tokenizer.convert_tokens_to_ids(",")]
  encode = jax.jit(llm.encode)
  collab = []
  for row in range(3 * batch_size):
    prompt = prompts[0 if row < batch_size else 1]
    prompt_ids = tokenizer(prompt)["input_ids"]  # [CLS] ... [SEP]
    pieces = [table[prompt_ids[:-1]]]
    for word in range(words):
      if word:
        pieces.append(comma[None])
      pieces.append(back[row, word][None])
    pieces.append(table[prompt_ids[-1:]])
    sentence = np.concatenate(pieces)[None].astype(np.float32)
    mask = np.ones(sentence.shape[:2], np.int32)
    collab.append(np.asarray(encode(llm.params, sentence, mask))[0])
  users = np.asarray(constants["user_profiles"])[np.asarray(batch["user"])]
  items = np.asarray(constants["item_profiles"])
  profile = np.concatenate(
    [users, items[np.asarray(batch["pos"])], items[np.asarray(batch["neg"])]]
  )
  expected = _numpy_info_nce(np.array(collab, np.float64), profile, 0.02)
  np.testing.assert_allclose(loss, expected, rtol=2e-4)


def test_alignment_gradient_reaches_the_words_not_the_codebook_map(
  config, parts, dataset, constants
):
  loss_terms = face_stages.make_face_loss(config, parts, align=True)
  batches = face_stages.make_stage_batches(
    config, config.align, dataset, face_stages.ALIGN
  )(1)
  batch = {name: values[0] for name, values in batches.items()}
  params = _state(config, parts).params
  grads = jax.jit(
    jax.grad(
      lambda p: loss_terms(p, constants, batch, jax.random.key(4))[0]["align"]
    )
  )(params)
  face_grads = grads[face_stages.FACE]
  # The pseudo-inverse and the straight-through z_q pass nothing to the
  # codebook map; the words' encoder and projection and the batch's
  # backbone rows get gradients.
  for leaf in jax.tree.leaves(face_grads["codebook_map"]):
    np.testing.assert_array_equal(leaf, 0.0)
  for leaf in jax.tree.leaves(face_grads["projection"]):
    assert np.any(leaf != 0)
  assert np.any(face_grads["encoder"]["ff1"]["kernel"] != 0)
  user_grads = np.asarray(grads[face_stages.BACKBONE]["user"])
  touched = np.flatnonzero(np.any(user_grads != 0, axis=1))
  np.testing.assert_array_equal(touched, np.unique(batch["user"]))
  # The decoder only serves reconstruction.
  for leaf in jax.tree.leaves(face_grads["decoder"]):
    np.testing.assert_array_equal(leaf, 0.0)


def test_llm_dropout_follows_the_config(config, parts, constants):
  face_params = _state(config, parts).params["face"]
  z_q = jax.random.normal(jax.random.key(2), (6, 4, config.face.word_dim))
  batch = {name: jnp.arange(2, dtype=jnp.int32) for name in ("user", "pos")}
  batch["neg"] = jnp.array([4, 5], jnp.int32)

  def loss(dropout, seed):
    return float(
      _alignment_loss(
        parts.llm,
        face_params,
        z_q,
        batch,
        constants,
        jax.random.key(seed),
        llm_dropout=dropout,
        temperature=0.02,
      )
    )

  assert loss(False, 0) == loss(False, 1)
  assert loss(True, 0) == loss(True, 0)
  assert loss(True, 0) != loss(True, 1)
  assert loss(True, 0) != loss(False, 0)


@pytest.mark.parametrize("chunk", [0, 2, 4, 5, 6])
def test_chunked_encoding_matches_one_call_in_value_and_gradient(parts, chunk):
  # 5 sentences: chunk 2 pads one row, chunk 5 is one call, 6 is not
  # chunked at all; each must give the one-call values and gradients.
  llm = parts.llm
  hidden = llm.info.hidden_size
  sentences = jax.random.normal(jax.random.key(5), (5, 7, hidden))
  mask = jnp.ones((5, 7), jnp.int32).at[1, 5:].set(0).at[3, 2:].set(0)
  weights = jax.random.normal(jax.random.key(6), (5, hidden))

  def objective(inputs, chunk):
    encoded = face_stages.encode_sentences(
      llm,
      llm.params,
      inputs,
      mask,
      jax.random.key(0),
      llm_dropout=False,
      chunk=chunk,
    )
    return jnp.sum(encoded * weights), encoded

  grad = jax.jit(jax.grad(objective, has_aux=True), static_argnums=1)
  expected_grad, expected = grad(sentences, 0)
  got_grad, got = grad(sentences, chunk)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-4, atol=1e-6)
  assert np.all(np.abs(expected_grad[1, 5:]) == 0)


def test_chunked_dropout_matches_plain_calls_in_value_and_gradient(parts):
  # The chunked encoder keeps its dropout masks for the backward pass
  # instead of drawing them again; value and gradient must still be those
  # of plain calls on the same chunks with the same keys, without remat.
  llm = parts.llm
  hidden = llm.info.hidden_size
  sentences = jax.random.normal(jax.random.key(5), (5, 7, hidden))
  mask = jnp.ones((5, 7), jnp.int32).at[1, 5:].set(0)
  weights = jax.random.normal(jax.random.key(6), (5, hidden))
  rng = jax.random.key(4)

  def chunked(inputs):
    encoded = face_stages.encode_sentences(
      llm, llm.params, inputs, mask, rng, llm_dropout=True, chunk=2
    )
    return jnp.sum(encoded * weights), encoded

  def plain(inputs):
    padded = jnp.pad(inputs, ((0, 1), (0, 0), (0, 0)))
    padded_mask = jnp.pad(mask, ((0, 1), (0, 0)))
    keys = jax.random.split(rng, 3)
    encoded = jnp.concatenate(
      [
        llm.encode(
          llm.params,
          padded[2 * i : 2 * i + 2],
          padded_mask[2 * i : 2 * i + 2],
          deterministic=False,
          rng=keys[i],
        )
        for i in range(3)
      ]
    )[:5]
    return jnp.sum(encoded * weights), encoded

  got_grad, got = jax.jit(jax.grad(chunked, has_aux=True))(sentences)
  expected_grad, expected = jax.jit(jax.grad(plain, has_aux=True))(sentences)

  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-4, atol=1e-6)
  deterministic = face_stages.encode_sentences(
    llm, llm.params, sentences, mask, rng, llm_dropout=False, chunk=2
  )
  assert np.max(np.abs(got - deterministic)) > 1e-3


def test_negative_llm_chunk_is_refused(config, parts):
  bad = copy.deepcopy(config)
  bad.align.llm_chunk = -1
  with pytest.raises(face_stages.FaceStageError, match="llm_chunk=-1"):
    face_stages.make_face_loss(bad, parts, align=True)


def test_stage_batches_are_seeded_by_epoch_and_capped(config, dataset):
  make = face_stages.make_stage_batches(
    config, config.align, dataset, face_stages.ALIGN
  )
  first, again, second = make(1), make(1), make(2)
  assert first["user"].shape == (3, config.align.batch_size)
  for name in first:
    np.testing.assert_array_equal(first[name], again[name])
  assert not np.array_equal(first["user"], second["user"])
  whole = face_stages.make_stage_batches(
    config, config.map, dataset, face_stages.MAP
  )(1)
  # Every train triple once (the last batch filled up), users first.
  steps = -(-len(dataset.train) // config.map.batch_size)
  assert whole["user"].shape == (steps, config.map.batch_size)
  pairs = np.stack([whole["user"].ravel(), whole["pos"].ravel()], axis=1)
  assert {tuple(p) for p in pairs} == {tuple(p) for p in dataset.train}
  bad = copy.deepcopy(config)
  bad.map.steps_per_epoch = -1
  with pytest.raises(face_stages.FaceStageError, match="steps_per_epoch"):
    face_stages.make_stage_batches(bad, bad.map, dataset, face_stages.MAP)


def test_missing_inputs_give_clear_errors(config, parts, tmp_path):
  with pytest.raises(FileNotFoundError, match="No finished map stage"):
    face_stages.restore_face_params(config, parts, tmp_path / "map")
  no_text = text_dataset(text=False)
  with pytest.raises(face_stages.FaceStageError, match=r"usr_prf\.pkl"):
    face_stages.profile_targets(config, parts.llm, no_text, tmp_path)
  assert face_stages.align_skip_reason(config, no_text).startswith("tiny")
  assert face_stages.align_skip_reason(config, text_dataset()) is None


def test_vocabulary_smaller_than_the_words_is_refused(bert_folder, dataset):
  config = tiny_config(bert_folder, vocab__size=2)
  with pytest.raises(face_stages.FaceStageError, match="num_words=4"):
    face_stages.load_face_parts(config, dataset)


def test_auto_rng_is_philox_on_one_device_and_threefry_on_several(config):
  assert face_stages.resolve_rng_impl("auto", 1) == "philox4x32"
  assert face_stages.resolve_rng_impl("auto", 8) == "threefry2x32"
  assert face_stages.resolve_rng_impl("philox4x32", 8) == "philox4x32"
  # The tests run on 8 devices, so "auto" keys are threefry keys.
  key = face_stages.stage_rng(config, face_stages.MAP)
  assert jax.random.key_impl(key) == jax.random.key_impl(
    jax.random.key(0, impl="threefry2x32")
  )
  bad = copy.deepcopy(config)
  bad.face.rng_impl = "mersenne"
  with pytest.raises(face_stages.FaceStageError, match="'mersenne'"):
    face_stages.stage_rng(bad, face_stages.MAP)


def test_distinct_count_counts_different_tokens():
  tokens = jnp.array([[3, 1, 2], [1, 2, 3], [7, 3, 0]], jnp.int32)
  assert float(face_stages.distinct_count(tokens)) == 5.0
  # Every entity with the same words: collapse shows as W tokens.
  same = jnp.tile(jnp.array([[9, 4, 5, 6]], jnp.int32), (6, 1))
  assert float(face_stages.distinct_count(same)) == 4.0
