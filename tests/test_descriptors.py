"""Descriptors: describing every entity, sentences, retrieval, export."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from _face_fixtures import (
  cache_folder,
  shared_compilation_cache,
  text_dataset,
  tiny_config,
  write_tiny_bert,
)

from face_jax import descriptors
from face_jax.models import alignment
from face_jax.models import face as face_lib
from face_jax.training import face_stages


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  with shared_compilation_cache(cache_folder(tmp_path_factory)):
    yield


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  return tiny_config(write_tiny_bert(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture(scope="module")
def parts(config):
  return face_stages.load_face_parts(config, text_dataset())


def _brute_force_ranks(queries, targets, rows):
  ranks = []
  for query, own in zip(queries, rows, strict=True):
    sims = targets @ query
    others = np.delete(sims, own)
    ranks.append(int(np.sum(others >= sims[own])))
  return np.array(ranks)


def test_self_retrieval_against_brute_force_with_ties():
  rng = np.random.default_rng(0)
  targets = rng.normal(size=(9, 5))
  targets[4] = targets[2]  # a duplicate profile ties with its twin
  targets /= np.linalg.norm(targets, axis=1, keepdims=True)
  queries = targets[[2, 4, 0, 7, 8]] + 0.6 * rng.normal(size=(5, 5))
  queries /= np.linalg.norm(queries, axis=1, keepdims=True)
  rows = np.array([2, 4, 0, 7, 8])
  ranks = _brute_force_ranks(queries, targets, rows)
  assert ranks[0] >= 1 and ranks[1] >= 1  # the tie counts against both
  got = descriptors.self_retrieval(queries, targets, rows, (1, 3), chunk=2)
  assert got["top1"] == pytest.approx(np.mean(ranks < 1))
  assert got["top3"] == pytest.approx(np.mean(ranks < 3))
  assert got["mean_rank"] == pytest.approx(np.mean(ranks))
  perfect = descriptors.self_retrieval(
    targets[:4], targets[:4], np.arange(4), (1,)
  )
  assert perfect["top1"] == 1.0


def test_sentence_ids_spell_the_prompt_and_words(config, parts):
  layout = face_stages.sentence_layout(parts.llm, "movie", 4)
  tokenizer = parts.llm.tokenizer
  chosen = [
    ["war", "music", "story", "family"],
    ["city", "dark", "art", "home"],
  ]
  word_ids = np.array([tokenizer.convert_tokens_to_ids(w) for w in chosen])
  prompts = {
    alignment.USER: alignment.USER_PROMPT,
    alignment.ITEM: alignment.item_prompt("movie"),
  }
  for entity_type, prompt in prompts.items():
    ids, mask = descriptors.sentence_ids(layout, entity_type, word_ids)
    assert ids.shape == mask.shape == (2, layout.length)
    for row, words in enumerate(chosen):
      expected = tokenizer(f"{prompt} {', '.join(words)}")["input_ids"]
      assert ids[row][mask[row] == 1].tolist() == expected
      assert mask[row].tolist() == [1] * len(expected) + [0] * (
        layout.length - len(expected)
      )


def test_describe_all_matches_the_module_in_one_call(config, parts):
  params = face_stages.initial_map_state(
    config, parts, parts.backbone.init(jax.random.key(1))
  ).params
  # Spread the projection so that entities get different words.
  params["face"]["projection"]["kernel"] = (
    params["face"]["projection"]["kernel"] * 300.0
  )
  # Batches of 7 leave a padded last batch for both tables.
  batched = descriptors.describe_all(parts, params, batch_size=7)
  users, items = parts.backbone.embed(params["backbone"], parts.graph)
  direct = parts.model.apply(
    {"params": params["face"]},
    np.concatenate([users, items]),
    parts.codebook,
    method=face_lib.FACE.describe,
  )
  np.testing.assert_array_equal(
    np.concatenate([batched["user"], batched["item"]]), direct
  )
  for kind, table in (("user", users), ("item", items)):
    assert batched[kind].shape == (len(table), config.face.num_words)
    assert all(len(set(row)) == config.face.num_words for row in batched[kind])
  assert len({tuple(row) for row in batched["user"]}) > 1


@pytest.mark.parametrize("with_text", [True, False])
def test_write_descriptors(tmp_path, with_text):
  dataset = text_dataset(num_users=2, num_items=3, text=with_text)
  if with_text:
    dataset = dataclasses.replace(
      dataset, user_text=("likes\twar\nfilms", "calm")
    )
  words = ("war", "music", "story", "family")
  tokens = {
    "user": np.array([[0, 1], [2, 3]]),
    "item": np.array([[3, 2], [1, 0], [0, 2]]),
  }
  descriptors.write_descriptors(tmp_path, words, tokens, dataset)
  lines = (tmp_path / descriptors.JSONL_FILE).read_text().splitlines()
  records = [json.loads(line) for line in lines]
  assert [(r["type"], r["id"]) for r in records] == [
    ("user", 0),
    ("user", 1),
    ("item", 0),
    ("item", 1),
    ("item", 2),
  ]
  assert records[0]["words"] == ["war", "music"]
  assert records[4]["words"] == ["war", "story"]
  rows = (tmp_path / descriptors.TSV_FILE).read_text().splitlines()
  assert rows[0] == "type\tid\twords\ttext"
  if with_text:
    assert records[0]["text"] == "likes\twar\nfilms"
    assert records[2]["text"] == dataset.item_text[0]
    assert rows[1] == "user\t0\twar, music\tlikes war films"
  else:
    assert all(record["text"] is None for record in records)
    assert rows[3] == "item\t0\tfamily, story\t"
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
