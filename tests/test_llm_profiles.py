"""Profile embeddings: bucketed batches, order, compile count and cache."""

import pathlib

import jax
import numpy as np
import pytest

from configs.base import get_base_config
from face_jax.llm import load_llm, profiles

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "llm"
WORDS = ["the", "game", "is", "a", "fun", "puzzle", "adventure", "with"]
WORDS += ["calm", "story", "in", "city"]


@pytest.fixture(scope="module")
def tiny():
  config = get_base_config().llm
  config.model = str(FIXTURES / "tiny_qwen2")
  config.append_eos = True
  return load_llm(config)


@pytest.fixture(scope="module")
def texts():
  # 23 texts of 1 to 34 words, in no particular length order.
  rng = np.random.default_rng(0)
  lengths = rng.permutation(np.arange(1, 35))[:23]
  return [" ".join(rng.choice(WORDS, size=n)) for n in lengths]


def test_length_buckets():
  assert profiles.length_buckets(256)[-4:] == (160, 192, 224, 256)
  assert profiles.length_buckets(100) == (16, 32, 48, 64, 80, 96, 100)
  assert profiles.length_buckets(16) == (16,)
  assert profiles.length_buckets(40, (16, 8, 16)) == (8, 16, 40)


def test_encode_texts_matches_one_padded_batch_in_order(tiny, texts):
  ids, mask = tiny.tokenize(texts, 40)
  assert ids.shape[1] == 40  # some texts are truncated
  expected = np.asarray(jax.jit(tiny.encode_ids)(tiny.params, ids, mask))
  before = profiles._encode_batch._cache_size()
  ours = profiles.encode_texts(
    tiny, texts, batch_size=3, max_length=40, buckets=(8, 16), progress=False
  )
  # 8 batches, but at most one program per bucket length (8, 16, 40).
  assert profiles._encode_batch._cache_size() - before <= 3
  assert ours.shape == (len(texts), 32) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, expected, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
  assert profiles.encode_texts(tiny, [], batch_size=3, max_length=40).shape == (
    0,
    32,
  )


def test_profile_cache_reused_until_text_or_settings_change(
  tiny, texts, tmp_path, monkeypatch
):
  calls = []
  real_encode = profiles.encode_texts

  def counting_encode(*args, **kwargs):
    calls.append(len(args[1]))
    return real_encode(*args, **kwargs)

  monkeypatch.setattr(profiles, "encode_texts", counting_encode)

  def embed(texts, max_length=40, llm=tiny):
    return profiles.profile_embeddings(
      llm,
      texts,
      workdir=tmp_path,
      name="item",
      batch_size=4,
      max_length=max_length,
      progress=False,
    )

  first = embed(texts)
  cached = embed(texts)
  assert len(calls) == 1
  np.testing.assert_array_equal(first, cached)
  files = sorted((tmp_path / profiles.CACHE_FOLDER).iterdir())
  assert [f.suffix for f in files] == [".npy"]  # no temporary file left

  changed = [*texts[:-1], texts[-1] + " city"]
  embed(changed)
  embed(texts, max_length=24)
  assert len(calls) == 3
  np.testing.assert_array_equal(embed(texts), first)
  assert len(calls) == 3

  config = get_base_config().llm
  config.model = str(FIXTURES / "tiny_qwen2")
  other_model = load_llm(config)  # no append_eos: another fingerprint
  embed(texts, llm=other_model)
  assert len(calls) == 4
  assert len(list((tmp_path / profiles.CACHE_FOLDER).iterdir())) == 4
