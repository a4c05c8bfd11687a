"""`python -m face_jax.prepare`: own interactions -> RLMRec folder."""

import csv
import gzip
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from _shared_data import require

from face_jax.data import DataError, safe_pickle
from face_jax.data.prepare_lib import PrepareOptions, prepare
from face_jax.data.rlmrec import load_rlmrec, matrix_pairs
from face_jax.data.split import eval_count

_REPO = pathlib.Path(__file__).resolve().parents[1]
# Fixed words of user texts; a value inside them proves nothing.
_TEMPLATE_WORDS = (
  "This user liked games, such as Most common genres tags specs developer "
  "publisher"
)

# user -> items, in time order.
HISTORY = {
  "alice": ["g1", "g2", "g3", "g4", "g5"],
  "bob": ["g2", "g3", "g6"],
  "carol": ["g1"],
  "dave": ["g1", "g2", "g3", "g4", "g5", "g6", "g7", "g8"],
}
META = [
  {"id": "g1", "title": "Alpha", "genres": ["Action"], "url": "http://a"},
  {"id": "g2", "title": "Beta &amp; Co", "genres": ["Puzzle"], "price": 9.5},
  {"id": "g3", "name": "Gamma", "tags": ["Co-op", "Space"]},
  {"id": "g4", "title": "Delta", "genres": ["Action"], "developer": "Zed"},
  {"id": "g5", "title": "Epsilon", "genres": ["Western"], "product": "123"},
  {"id": "g6", "title": "Zeta", "genres": ["Racing"]},
  {"id": "g7", "title": "Eta", "genres": ["Horror"]},
  {"id": "g8", "title": "Theta", "genres": ["Sports"]},
  {"id": "g9", "title": "Never played", "genres": ["Music"]},
]


def _rows():
  return [
    {"user": user, "item": item, "timestamp": 1000 + 10 * step}
    for user, items in HISTORY.items()
    for step, item in enumerate(items)
  ]


def _write_csv(path, rows, fields=("user", "item", "timestamp")):
  with open(path, "w", newline="", encoding="utf-8") as file:
    writer = csv.DictWriter(file, fieldnames=list(fields))
    writer.writeheader()
    writer.writerows({key: row[key] for key in fields} for row in rows)
  return str(path)


def _write_jsonl(path, records):
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wt", encoding="utf-8") as file:
    for record in records:
      file.write(json.dumps(record) + "\n")
  return str(path)


def _options(tmp_path, **fields):
  defaults = {
    "interactions": _write_csv(tmp_path / "plays.csv", _rows()),
    "item_meta": _write_jsonl(tmp_path / "meta.jsonl", META),
    "meta_id_key": "id",
    "item_noun": "game",
    "output": str(tmp_path / "out"),
  }
  defaults.update(fields)
  return PrepareOptions(**defaults)


def _original_pairs(folder, data):
  users = json.loads((folder / "user_ids.json").read_text())
  items = json.loads((folder / "item_ids.json").read_text())
  return (
    users,
    items,
    {
      split: {(users[u], items[i]) for u, i in getattr(data, split)}
      for split in ("train", "valid", "test")
    },
  )


def test_csv_round_trip(tmp_path):
  result = prepare(_options(tmp_path))
  folder = tmp_path / "out"
  data = load_rlmrec(folder, "mine")
  users, items, pairs = _original_pairs(folder, data)
  assert users == ["alice", "bob", "carol", "dave"]
  assert items == [f"g{i}" for i in range(1, 9)]
  everything = pairs["train"] | pairs["valid"] | pairs["test"]
  assert everything == {(u, i) for u, seq in HISTORY.items() for i in seq}
  assert len(data.train) + len(data.valid) + len(data.test) == 17
  for user, seq in HISTORY.items():
    k = int(eval_count(len(seq)))
    assert sum(u == user for u, _ in pairs["test"]) == k
    assert sum(u == user for u, _ in pairs["valid"]) == k
  assert (result.num_users, result.num_items) == (4, 8)
  assert result.train_only_users == 1  # carol
  # Item texts from metadata, links and bare numbers left out.
  # Entities unescaped; the price (a number) is not text in automatic mode.
  assert data.item_text[1] == "Beta & Co is a game. Genres: Puzzle."
  assert data.item_text[4] == "Epsilon is a game. Genres: Western."
  assert data.item_text[0] == "Alpha is a game. Genres: Action."
  assert data.item_text[2] == "Gamma is a game. Tags: Co-op and Space."
  meta = json.loads((folder / "meta.json").read_text())
  assert meta["counts"] == result.counts
  assert meta["seed"] == 0 and meta["split"] == "random"
  assert meta["num_users"] == 4 and meta["train_only_users"] == 1
  # The matrices are what our own safe loader reads.
  train = safe_pickle.load_sparse_matrix(folder / "trn_mat.pkl")
  np.testing.assert_array_equal(matrix_pairs(train), data.train)


def test_jsonl_with_own_keys_and_time_split(tmp_path):
  rows = [
    {"uid": r["user"], "game": r["item"], "when": r["timestamp"]}
    for r in _rows()
  ]
  options = _options(
    tmp_path,
    interactions=_write_jsonl(tmp_path / "plays.jsonl.gz", rows[::-1]),
    user_key="uid",
    item_key="game",
    time_key="when",
    split="time",
  )
  prepare(options)
  folder = tmp_path / "out"
  data = load_rlmrec(folder, "mine")
  _, _, pairs = _original_pairs(folder, data)
  assert {i for u, i in pairs["test"] if u == "alice"} == {"g5"}
  assert {i for u, i in pairs["valid"] if u == "alice"} == {"g4"}
  assert {i for u, i in pairs["test"] if u == "dave"} == {"g7", "g8"}
  assert {i for u, i in pairs["train"] if u == "carol"} == {"g1"}
  alice = data.user_text[0]
  # Epsilon (Western) is alice's test game: it must not leak into her text.
  assert "Epsilon" not in alice and "Western" not in alice
  # Train games by train popularity (Alpha 3, Beta 3, Gamma 2); no genre is
  # shared by two of alice's train games, so none is "most common".
  assert alice == "This user liked 3 games, such as Alpha, Beta & Co and Gamma."
  assert data.user_text[3] == (
    "This user liked 4 games, such as Alpha, Beta & Co, Gamma and Delta. "
    "Most common genres: Action."
  )


def test_user_texts_use_train_items_only(tmp_path):
  prepare(_options(tmp_path, seed=3))
  folder = tmp_path / "out"
  data = load_rlmrec(folder, "mine")
  users, _, pairs = _original_pairs(folder, data)
  meta = {record["id"]: record for record in META}
  checked = 0
  for index, user in enumerate(users):
    train = {i for u, i in pairs["train"] if u == user}
    held = {i for u, i in pairs["valid"] | pairs["test"] if u == user}
    train_words = {
      word
      for item in train
      for value in meta[item].values()
      for word in (value if isinstance(value, list) else [str(value)])
    }
    for item in held:
      for value in (meta[item].get("title"), *meta[item].get("genres", [])):
        if value and value not in train_words:
          assert value not in data.user_text[index]
          checked += 1
  assert checked > 0


def test_integer_ids_are_numbered_in_numeric_order(tmp_path):
  rows = [
    {"user": user, "item": item}
    for user, item in [(10, 2), (9, 10), (-1, 2), (10, 10), (9, 1)]
  ]
  options = _options(
    tmp_path,
    interactions=_write_csv(tmp_path / "n.csv", rows, ("user", "item")),
    item_meta="",
  )
  prepare(options)
  out = tmp_path / "out"
  assert json.loads((out / "user_ids.json").read_text()) == ["-1", "9", "10"]
  assert json.loads((out / "item_ids.json").read_text()) == ["1", "2", "10"]
  data = load_rlmrec(out, "mine")
  merged = np.concatenate([data.train, data.valid, data.test])
  assert set(map(tuple, merged.tolist())) == {
    (2, 1),
    (1, 2),
    (0, 1),
    (2, 2),
    (1, 0),
  }


def test_repeated_pairs_keep_the_earliest_time(tmp_path):
  rows = [
    {"user": "u", "item": item, "timestamp": t}
    for item, t in [("a", 5), ("b", 1), ("c", 2), ("a", 0), ("d", 3)]
  ]
  rows += [{"user": "u", "item": "e", "timestamp": 4}]
  options = _options(
    tmp_path,
    interactions=_write_csv(tmp_path / "r.csv", rows),
    item_meta="",
    split="time",
  )
  prepare(options)
  data = load_rlmrec(tmp_path / "out", "mine")
  items = json.loads((tmp_path / "out" / "item_ids.json").read_text())
  # Order a(0), b(1), c(2), d(3), e(4): d to valid, e to test.
  assert [items[i] for _, i in data.valid] == ["d"]
  assert [items[i] for _, i in data.test] == ["e"]
  assert data.item_text[0] == "A game with no description."


def _assert_refused(tmp_path, match, **fields):
  with pytest.raises(DataError, match=match) as caught:
    prepare(_options(tmp_path, **fields))
  assert "\n" not in str(caught.value)
  assert not (tmp_path / "out").exists()
  assert not [name for name in os.listdir(tmp_path) if "tmp" in name]


def test_bad_inputs_are_refused_and_leave_nothing(tmp_path):
  _assert_refused(
    tmp_path, "no such interactions file", interactions="/nonexistent.csv"
  )
  _assert_refused(tmp_path, "no 'usr' column", user_key="usr")
  header_only = tmp_path / "empty.csv"
  header_only.write_text("user,item\n")
  _assert_refused(tmp_path, "no interactions", interactions=str(header_only))
  bad_json = tmp_path / "bad.jsonl"
  bad_json.write_text('{"user": "a", "item": "b"}\n{oops\n')
  _assert_refused(
    tmp_path, r"bad.jsonl:2: not JSON", interactions=str(bad_json)
  )
  no_time = _write_csv(tmp_path / "nt.csv", _rows(), ("user", "item"))
  _assert_refused(
    tmp_path, "--split=time needs", interactions=no_time, split="time"
  )
  _assert_refused(
    tmp_path,
    r"1 of 8 items have no metadata .*first: g8",
    item_meta=_write_jsonl(tmp_path / "m.jsonl", META[:7] + META[8:]),
    require_meta=True,
  )
  _assert_refused(tmp_path, "no 'sku' key", meta_id_key="sku")
  _assert_refused(tmp_path, "cannot tell the format", interactions=__file__)
  binary = tmp_path / "binary.csv"
  binary.write_bytes(b"user,item\n\xff\xfe,\x00\n")
  _assert_refused(tmp_path, "unreadable as csv", interactions=str(binary))
  not_gzip = tmp_path / "plays.csv.gz"
  not_gzip.write_text("user,item\na,b\n")
  _assert_refused(tmp_path, "unreadable as csv", interactions=str(not_gzip))


def test_missing_metadata_warns_by_default(tmp_path, caplog):
  partial = _write_jsonl(tmp_path / "m.jsonl", META[:7])
  result = prepare(_options(tmp_path, item_meta=partial))
  assert result.items_without_meta == 1
  assert "1 of 8 items have no metadata" in caplog.text
  data = load_rlmrec(tmp_path / "out", "mine")
  assert data.item_text[7] == "A game with no description."
  empty = _write_jsonl(tmp_path / "e.jsonl", [])
  with pytest.raises(DataError, match="no metadata records"):
    prepare(_options(tmp_path, item_meta=empty, output=str(tmp_path / "x")))
  assert not (tmp_path / "x").exists()


def test_existing_output_needs_overwrite(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(DataError, match="pass --overwrite"):
    prepare(_options(tmp_path))
  assert (out / "keep.txt").read_text() == "mine"
  prepare(_options(tmp_path, overwrite=True))
  assert not (out / "keep.txt").exists()
  assert (out / "trn_mat.pkl").exists()
  assert sorted(os.listdir(tmp_path)) == ["meta.jsonl", "out", "plays.csv"]


def test_command_line(tmp_path):
  interactions = _write_csv(tmp_path / "plays.csv", _rows())
  command = [
    sys.executable,
    "-m",
    "face_jax.prepare",
    f"--interactions={interactions}",
    f"--output={tmp_path / 'out'}",
    "--user_key=player",
  ]
  failed = subprocess.run(
    command, cwd=_REPO, capture_output=True, text=True, check=False
  )
  assert failed.returncode == 1
  assert (
    failed.stderr.strip()
    .splitlines()[-1]
    .startswith("prepare: " + interactions + ":2: no 'player' column")
  )
  assert not (tmp_path / "out").exists()
  command[-1] = "--seed=1"
  done = subprocess.run(
    command, cwd=_REPO, capture_output=True, text=True, check=False
  )
  assert done.returncode == 0, done.stderr
  assert "4 users x 8 items" in done.stdout
  meta = json.loads((tmp_path / "out" / "meta.json").read_text())
  assert meta["command"][:3] == ["python", "-m", "face_jax.prepare"]
  assert meta["seed"] == 1


def test_real_steam_subset(tmp_path):
  """First 300 Steam users: texts come from metadata and train games only."""
  steam = require("steam")
  pairs = np.concatenate(
    [
      matrix_pairs(safe_pickle.load_sparse_matrix(steam / name))
      for name in ("val_mat.pkl", "tst_mat.pkl")
    ]
  )
  pairs = pairs[pairs[:, 0] < 300]
  rows = [{"user": u, "item": i} for u, i in pairs.tolist()]
  options = PrepareOptions(
    interactions=_write_csv(tmp_path / "steam.csv", rows, ("user", "item")),
    output=str(tmp_path / "out"),
    item_meta=str(steam / "steam_item_meta.jsonl"),
    meta_id_key="iid",
    text_fields=("title", "genres", "tags", "specs", "developer", "publisher"),
    item_noun="game",
    require_meta=True,
  )
  result = prepare(options)
  assert result.items_without_meta == 0
  assert sum(result.counts.values()) == len(pairs)
  data = load_rlmrec(tmp_path / "out", "steam-subset")
  users = [
    int(u) for u in json.loads((tmp_path / "out/user_ids.json").read_text())
  ]
  items = [
    int(i) for i in json.loads((tmp_path / "out/item_ids.json").read_text())
  ]
  assert users == sorted(set(pairs[:, 0].tolist()))
  with open(steam / "steam_item_meta.jsonl", encoding="utf-8") as file:
    meta = [json.loads(line) for line in file]
  # Item text carries the game's own title and genres.
  for index in (0, len(items) // 2, len(items) - 1):
    record = meta[items[index]]
    text = data.item_text[index]
    assert text.startswith(record["title"].replace("&amp;", "&"))
    for genre in record["genres"] or []:
      assert genre in text
  checked = 0
  for user in range(data.num_users):
    train = data.train[data.train[:, 0] == user, 1]
    held = np.concatenate(
      [
        data.valid[data.valid[:, 0] == user, 1],
        data.test[data.test[:, 0] == user, 1],
      ]
    )
    train_text = "\n".join(
      value
      for i in train
      for field in meta[items[i]].values()
      for value in (field if isinstance(field, list) else [str(field)])
    ).replace("&amp;", "&")
    for item in held:
      record = meta[items[item]]
      for value in [
        record["title"],
        *(record["genres"] or []),
        *(record["tags"] or []),
      ]:
        value = value.replace("&amp;", "&")
        if value not in train_text and value not in _TEMPLATE_WORDS:
          assert value not in data.user_text[user], (user, value)
          checked += 1
  assert checked > 100
