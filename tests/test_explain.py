"""Explanations and descriptor quality of a finished tiny run.

The run (every stage, tiny config) is shared with the notebook test; the
command-line tools run as a user runs them, in a subprocess.
"""

import collections
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from _finished_run import finished_run

from face_jax import explaining, runs

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _command(module, *flags):
  return subprocess.run(
    [sys.executable, "-m", module, *flags],
    cwd=_ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )


@pytest.fixture(scope="module")
def run_and_dataset(tmp_path_factory):
  workdir, dataset = finished_run(tmp_path_factory)
  return runs.open_run(workdir), dataset


@pytest.fixture(scope="module")
def explainer(run_and_dataset):
  run, _ = run_and_dataset
  return explaining.Explainer(run)


def test_top_items_rank_by_score_skip_excluded_and_break_ties_by_id():
  items = np.array([[1.0], [3.0], [3.0], [2.0], [5.0], [3.0]])
  chosen, scores = explaining.top_items(np.array([1.0]), items, [4], 4)
  assert chosen.tolist() == [1, 2, 5, 3]
  assert scores.tolist() == [3.0, 3.0, 3.0, 2.0]
  # Fewer items left than asked: all of them.
  chosen, _ = explaining.top_items(np.array([1.0]), items, [0, 1, 2, 3], 9)
  assert chosen.tolist() == [4, 5]


def test_shared_words_keep_the_first_list_order():
  assert explaining.shared_words(
    ["war", "drama", "music"], ["music", "war"]
  ) == [
    "war",
    "music",
  ]
  assert explaining.shared_words(["a"], []) == []


def test_user_explanation_matches_the_run(run_and_dataset, explainer):
  run, dataset = run_and_dataset
  user = 3
  explanation = explainer.user(user, top_k=5)
  record = json.loads(
    (run.workdir / "descriptors" / "descriptors.jsonl")
    .read_text()
    .splitlines()[user]
  )
  assert explanation["words"] == record["words"]
  assert explanation["text"] == dataset.user_text[user]
  assert explanation["stage"] == "align"
  train = set(dataset.train[dataset.train[:, 0] == user, 1].tolist())
  test = set(dataset.test[dataset.test[:, 0] == user, 1].tolist())
  valid = set(dataset.valid[dataset.valid[:, 0] == user, 1].tolist())
  scores = explainer.item_table @ explainer.user_table[user]
  # Independent ranking: by score descending, then by item id.
  expected = [
    item
    for item in np.lexsort((np.arange(len(scores)), -scores))
    if item not in train
  ][:5]
  recommended = explanation["recommendations"]
  assert [entry["item"] for entry in recommended] == expected
  assert [entry["rank"] for entry in recommended] == [1, 2, 3, 4, 5]
  for entry in recommended:
    item_words = run.descriptors["item"][entry["item"]]["words"]
    assert entry["words"] == item_words
    assert set(entry["shared_words"]) == set(record["words"]) & set(item_words)
    assert entry["in_test"] == (entry["item"] in test)
    assert entry["in_valid"] == (entry["item"] in valid)
    assert entry["text"] == dataset.item_text[entry["item"]]
  assert explanation["test_items"] == sorted(test)
  assert explanation["hits"] == len(test & set(expected))
  assert explanation["train_items"] == len(train)
  text = explaining.format_explanation(explanation)
  assert ", ".join(record["words"]) in text
  assert text.count("[held-out test item]") == explanation["hits"]


def test_hits_reproduce_the_evaluated_test_recall(run_and_dataset, explainer):
  run, dataset = run_and_dataset
  recalls = []
  for user in np.unique(dataset.test[:, 0]):
    explanation = explainer.user(int(user), top_k=20)
    recalls.append(explanation["hits"] / len(explanation["test_items"]))
  evaluated = run.results["align"]["test"]["recall@20"]
  assert np.mean(recalls) == pytest.approx(evaluated, abs=1e-5)


def test_item_explanation_and_unknown_ids(run_and_dataset, explainer):
  run, dataset = run_and_dataset
  item = explainer.item(7)
  assert item["words"] == run.descriptors["item"][7]["words"]
  assert item["text"] == dataset.item_text[7]
  assert item["train_users"] == int(np.sum(dataset.train[:, 1] == 7))
  with pytest.raises(runs.RunError, match=r"User 24 is not in this run"):
    explainer.user(dataset.num_users)
  with pytest.raises(runs.RunError, match=r"Item -1 is not in this run"):
    explainer.item(-1)


def test_usage_in_metrics_counts_the_exported_words(run_and_dataset):
  run, _ = run_and_dataset
  counts = collections.Counter(
    word
    for kind in ("user", "item")
    for record in run.descriptors[kind]
    for word in record["words"]
  )
  usage = run.results["descriptors"]["usage"]["all"]
  assert usage["distinct_tokens"] == len(counts)
  shares = np.array(list(counts.values())) / sum(counts.values())
  assert usage["perplexity"] == pytest.approx(
    np.exp(-np.sum(shares * np.log(shares)))
  )
  top_count = max(counts.values())
  assert usage["most_used"][0][1] == top_count
  assert counts[usage["most_used"][0][0]] == top_count
  stability = run.results["descriptors"]["stability"]
  assert 0.0 <= stability["all"] <= 1.0
  assert set(run.results["descriptors"]["retrieval"]) == {
    "map",
    "align",
    "shuffled",
  }


def test_explain_command_prints_json_and_one_line_errors(
  run_and_dataset, explainer, tmp_path
):
  run, _ = run_and_dataset
  done = _command(
    "face_jax.explain", f"--workdir={run.workdir}", "--user=3", "--json"
  )
  assert done.returncode == 0, done.stderr
  assert json.loads(done.stdout) == explainer.user(3)
  done = _command("face_jax.explain", f"--workdir={run.workdir}", "--item=99")
  assert done.returncode != 0
  assert "Traceback" not in done.stderr
  last = done.stderr.strip().splitlines()[-1]
  assert (
    last == "explain: Item 99 is not in this run: item ids go from 0 to 29."
  )
  with pytest.raises(runs.RunError, match="does not exist"):
    runs.open_run(tmp_path / "none")
  unfinished = tmp_path / "unfinished"
  unfinished.mkdir()
  with pytest.raises(runs.RunError, match="not the workdir of a run"):
    runs.open_run(unfinished)
  (unfinished / "config.json").write_text(
    (run.workdir / "config.json").read_text()
  )
  with pytest.raises(runs.RunError, match="holds no finished run"):
    runs.open_run(unfinished)


def test_quality_command_repeats_the_descriptor_stage(run_and_dataset):
  run, _ = run_and_dataset
  done = _command("face_jax.quality", f"--workdir={run.workdir}", "--json")
  assert done.returncode == 0, done.stderr
  quality = json.loads(done.stdout)
  stored = run.results["descriptors"]
  assert quality["after"] == "align"
  assert quality["usage"] == stored["usage"]
  assert quality["stability"] == stored["stability"]
  assert set(quality["retrieval"]) == set(stored["retrieval"])
  for name, scores in stored["retrieval"].items():
    for kind, entry in scores.items():
      assert quality["retrieval"][name][kind] == pytest.approx(entry)
