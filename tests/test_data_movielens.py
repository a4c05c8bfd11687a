"""MovieLens-100K: parsers, fetch chain and cache, split and texts.

Everything runs on tiny files written here; downloads are replaced by fakes,
so no test touches the network.
"""

import io
import os
import pathlib
import subprocess
import zipfile

import ml_collections
import numpy as np
import pytest

from face_jax.data import DataError, load_dataset, movielens
from face_jax.data.split import eval_count

# id: (GroupLens title, release date, genres)
MOVIES = {
  1: ("Toy Story (1995)", "01-Jan-1995", ("Animation", "Children's", "Comedy")),
  2: ("Usual Suspects, The (1995)", "14-Aug-1995", ("Crime", "Thriller")),
  3: ("Godfather, The (1972)", "01-Jan-1972", ("Action", "Crime", "Drama")),
  4: ("Shane (1953)", "01-Jan-1953", ("Western",)),
  5: ("Casablanca (1942)", "01-Jan-1942", ("Drama", "Romance", "War")),
  6: ("unknown", "", ("unknown",)),
  7: ("Heat (1995)", "01-Jan-1995", ("Action", "Crime", "Thriller")),
}
# id: (age, gender, occupation)
PEOPLE = {
  1: (24, "M", "technician"),
  2: (53, "F", "other"),
  3: (18, "M", "student"),
  4: (30, "F", "none"),
}
# (user, item, rating, timestamp)
RATINGS = [
  *[(1, item, 5, 880000000 + item) for item in (1, 2, 3, 4, 5)],
  *[(2, item, 4, 881000000 + item) for item in (1, 2, 6)],
  (2, 7, 2, 881000007),
  (3, 1, 5, 882000001),
  (3, 3, 4, 882000003),
  (4, 3, 3, 883000003),
]


def _grouplens_files():
  data = "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS)
  items = ""
  for item, (title, date, genres) in MOVIES.items():
    flags = [
      "1" if genre in genres else "0" for genre in movielens.GROUPLENS_GENRES
    ]
    items += f"{item}|{title}|{date}||http://x|{'|'.join(flags)}\n"
  users = "".join(
    f"{user}|{age}|{gender}|{job}|00000\n"
    for user, (age, gender, job) in PEOPLE.items()
  )
  return {"u.data": data, "u.item": items, "u.user": users}


def _atomic_files():
  inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
  inter += "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS)
  items = "item_id:token\tmovie_title:token_seq\trelease_year:token\t"
  items += "class:token_seq\n"
  for item, (title, date, genres) in MOVIES.items():
    if title == "unknown":
      # RecBole's own copy misspells this one.
      items += f"{item}\tunkonwn\tunkonwn\tunknown\n"
      continue
    name = title[: -len(" (1995)")]
    items += f"{item}\t{name}\t{date[-4:]}\t{' '.join(genres)}\n"
  users = "user_id:token\tage:token\tgender:token\toccupation:token\t"
  users += "zip_code:token\n"
  users += "".join(
    f"{user}\t{age}\t{gender}\t{job}\t00000\n"
    for user, (age, gender, job) in PEOPLE.items()
  )
  return {"ml-100k.inter": inter, "ml-100k.item": items, "ml-100k.user": users}


def _write(folder, files):
  folder.mkdir(parents=True, exist_ok=True)
  for name, text in files.items():
    (folder / name).write_text(text, encoding="utf-8")
  return folder


def _zip_bytes(files, prefix):
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as archive:
    for name, text in files.items():
      archive.writestr(f"{prefix}/{name}", text)
  return buffer.getvalue()


def _config(**fields):
  config = ml_collections.ConfigDict(
    {
      "name": "movielens",
      "source": "movielens",
      "dir": "",
      "cache_dir": "",
      "item_noun": "movie",
      "min_rating": 4.0,
      "split_seed": 0,
    }
  )
  config.update(fields)
  return config


@pytest.fixture
def tiny_counts(monkeypatch):
  """Makes the download check accept the tiny fixture instead of 100K."""
  monkeypatch.setattr(
    movielens, "EXPECTED_COUNTS", {"ratings": 12, "users": 4, "items": 7}
  )


# Parsing.


@pytest.mark.parametrize("files", [_grouplens_files, _atomic_files])
def test_both_layouts_parse_to_the_same_content(tmp_path, files):
  raw = movielens.read_raw(str(_write(tmp_path, files())))
  np.testing.assert_array_equal(raw.users, [r[0] for r in RATINGS])
  np.testing.assert_array_equal(raw.items, [r[1] for r in RATINGS])
  np.testing.assert_array_equal(raw.ratings, [r[2] for r in RATINGS])
  np.testing.assert_array_equal(raw.timestamps, [r[3] for r in RATINGS])
  assert raw.movies[2] == movielens.Movie(
    "The Usual Suspects", 1995, ("Crime", "Thriller")
  )
  assert raw.movies[6] == movielens.Movie("", None, ("unknown",))
  assert raw.people[2] == movielens.Person(53, "F", "other")


def test_a_folder_without_either_layout_is_refused(tmp_path):
  _write(tmp_path, {"u.data": "1\t1\t5\t0\n"})
  with pytest.raises(DataError, match=r"neither u\.data, u\.item, u\.user"):
    movielens.read_raw(str(tmp_path))


def test_malformed_lines_name_the_file_and_line(tmp_path):
  files = _grouplens_files()
  files["u.item"] += "8|Broken (1990)|01-Jan-1990\n"
  _write(tmp_path, files)
  with pytest.raises(DataError, match=r"u.item:8: expected id\|title"):
    movielens.read_raw(str(tmp_path))


# Split and texts.


def test_positives_are_reindexed_densely_and_split(tmp_path):
  folder = _write(tmp_path / "ml", _grouplens_files())
  data, ids = movielens.load_movielens(_config(dir=str(folder)))
  # User 4 and item 7 have no rating >= 4 and are dropped.
  np.testing.assert_array_equal(ids.user_ids, [1, 2, 3])
  np.testing.assert_array_equal(ids.item_ids, [1, 2, 3, 4, 5, 6])
  assert (data.num_users, data.num_items) == (3, 6)
  merged = np.concatenate([data.train, data.valid, data.test])
  expected = {
    (u - 1, i - 1) for u, i, r, _ in RATINGS if r >= 4 and u != 4 and i != 7
  }
  assert set(map(tuple, merged)) == expected
  assert len(merged) == len(expected)
  per_user = np.bincount(merged[:, 0], minlength=3)
  k = eval_count(per_user)
  np.testing.assert_array_equal(np.bincount(data.test[:, 0], minlength=3), k)
  np.testing.assert_array_equal(np.bincount(data.valid[:, 0], minlength=3), k)
  # User 3 has two positives: both stay in train.
  assert set(data.train[data.train[:, 0] == 2, 1]) == {0, 2}


def test_split_is_deterministic_for_a_seed(tmp_path):
  folder = str(_write(tmp_path, _atomic_files()))
  first = load_dataset(_config(dir=folder, split_seed=5))
  again = load_dataset(_config(dir=folder, split_seed=5))
  np.testing.assert_array_equal(first.test, again.test)
  assert first.user_text == again.user_text


def test_item_and_user_texts(tmp_path):
  folder = _write(tmp_path, _grouplens_files())
  data, _ = movielens.load_movielens(_config(dir=str(folder)))
  assert data.item_text[0] == (
    "Toy Story is a 1995 animation, children's and comedy movie."
  )
  assert (
    data.item_text[1]
    == "The Usual Suspects is a 1995 crime and thriller movie."
  )
  assert data.item_text[5] == "An untitled movie."
  # User 3 (index 2) keeps Toy Story and The Godfather in train. All their
  # genres count once, so ties follow the GroupLens genre order; titles go
  # by train popularity, ties by item id.
  popularity = np.bincount(data.train[:, 1], minlength=6)
  titles = ["Toy Story", "The Godfather"]
  if popularity[2] > popularity[0]:
    titles.reverse()
  assert data.user_text[2] == (
    "An 18-year-old man who is a student. He mostly likes action, "
    f"animation and children's movies, such as {' and '.join(titles)}."
  )
  assert data.user_text[1].startswith(
    "A 53-year-old woman who works in an unlisted occupation. She mostly "
  )


def test_user_text_names_only_train_movies(tmp_path):
  """Across seeds, a title or genre appears iff a train movie carries it."""
  folder = str(_write(tmp_path, _grouplens_files()))
  raw = movielens.read_raw(folder)
  shane_in_eval = shane_in_train = 0
  for seed in range(12):
    data, ids = movielens.build(raw, "ml", 4.0, seed)
    for user in range(data.num_users):
      text = data.user_text[user]
      train = set(data.train[data.train[:, 0] == user, 1])
      held_out = set(data.valid[data.valid[:, 0] == user, 1]) | set(
        data.test[data.test[:, 0] == user, 1]
      )
      train_genres = {
        g.lower() for i in train for g in raw.movies[ids.item_ids[i]].genres
      }
      for item in train | held_out:
        movie = raw.movies[ids.item_ids[item]]
        if movie.title:
          # Every fixture user has <= 5 train movies, so all are named.
          assert (movie.title in text) == (item in train), (seed, text)
        for genre in movie.genres:
          if genre.lower() not in train_genres:
            assert genre.lower() not in text.lower(), (seed, text)
      if user == 0:
        shane = int(np.flatnonzero(ids.item_ids == 4)[0])
        shane_in_eval += shane in held_out
        shane_in_train += shane in train
        if shane in held_out:
          assert "western" not in text.lower()
  # Both cases occurred, so the checks above were exercised.
  assert shane_in_eval and shane_in_train


def test_no_positive_at_all_is_an_error(tmp_path):
  folder = str(_write(tmp_path, _grouplens_files()))
  with pytest.raises(DataError, match="no rating is >= min_rating=6"):
    load_dataset(_config(dir=folder, min_rating=6.0))


# Fetching and caching.


def test_chain_falls_through_to_the_next_source_and_caches(
  tmp_path, tiny_counts
):
  calls = []

  def failing(destination):
    calls.append("first")
    (tmp_path / "probe").write_text(destination)
    with open(os.path.join(destination, "u.data"), "w") as file:
      file.write("half")
    raise OSError("network unreachable")

  def working(destination):
    calls.append("second")
    _write(pathlib.Path(destination), _atomic_files())

  cache = tmp_path / "cache"
  folder = movielens.locate_raw(
    "", str(cache), [("first", failing), ("second", working)]
  )
  assert calls == ["first", "second"]
  assert folder == str(cache / "ml-100k")
  assert sorted(os.listdir(cache)) == ["ml-100k"]  # no staging left over
  assert sorted(os.listdir(folder)) == sorted(_atomic_files())

  def forbidden(destination):
    raise AssertionError("the cache should have been used")

  assert movielens.locate_raw("", str(cache), [("x", forbidden)]) == folder


def test_every_source_failing_names_them_all(tmp_path, caplog):
  def down(destination):
    raise OSError("no route to host")

  cache = tmp_path / "cache"
  with pytest.raises(DataError) as caught:
    movielens.locate_raw("", str(cache), [("mirror A", down), ("B", down)])
  message = str(caught.value)
  assert "mirror A or B" in message and "config.data.dir" in message
  assert "\n" not in message
  assert os.listdir(cache) == []
  assert "mirror A failed: OSError: no route to host" in caplog.text


def test_an_interrupted_fetch_leaves_no_cache(tmp_path):
  def interrupted(destination):
    _write(pathlib.Path(destination), {"ml-100k.inter": "partial"})
    raise KeyboardInterrupt

  cache = tmp_path / "cache"
  with pytest.raises(KeyboardInterrupt):
    movielens.locate_raw("", str(cache), [("slow", interrupted)])
  assert os.listdir(cache) == []


def test_a_download_of_the_wrong_size_is_rejected(tmp_path):
  def wrong(destination):
    _write(pathlib.Path(destination), _atomic_files())

  with pytest.raises(DataError, match="could not obtain"):
    movielens.locate_raw("", str(tmp_path / "c"), [("small", wrong)])


def test_real_fetchers_with_faked_network(tmp_path, monkeypatch, tiny_counts):
  """GroupLens times out; the recbole wheel from a faked pip is unpacked."""
  requested = []

  def no_network(url, timeout):
    requested.append((url, timeout))
    raise TimeoutError("timed out")

  wheel = _zip_bytes(_atomic_files(), movielens.RECBOLE_MEMBER_DIR)

  def fake_pip(command, **kwargs):
    assert command[1:4] == ["-m", "pip", "download"]
    assert "recbole==1.2.1" in command and "--no-deps" in command
    target = command[command.index("-d") + 1]
    os.makedirs(target)
    with open(
      os.path.join(target, "recbole-1.2.1-py3-none-any.whl"), "wb"
    ) as f:
      f.write(wheel)
    return subprocess.CompletedProcess(command, 0, "", "")

  monkeypatch.setattr(movielens.urllib.request, "urlopen", no_network)
  monkeypatch.setattr(movielens.subprocess, "run", fake_pip)
  data = load_dataset(_config(cache_dir=str(tmp_path / "cache")))
  assert requested == [(movielens.GROUPLENS_URL, 10)]
  assert data.num_users == 3
  cached = tmp_path / "cache" / "ml-100k"
  assert sorted(os.listdir(cached)) == sorted(_atomic_files())


def test_grouplens_archive_is_unpacked(tmp_path, monkeypatch, tiny_counts):
  archive = _zip_bytes(_grouplens_files(), "ml-100k")
  monkeypatch.setattr(
    movielens.urllib.request,
    "urlopen",
    lambda url, timeout: io.BytesIO(archive),
  )
  folder = movielens.locate_raw("", str(tmp_path))
  assert sorted(os.listdir(folder)) == sorted(_grouplens_files())


def test_a_failing_pip_is_reported(tmp_path, monkeypatch):
  monkeypatch.setattr(
    movielens.subprocess,
    "run",
    lambda command, **kwargs: subprocess.CompletedProcess(
      command, 1, "", "ERROR: No matching distribution found for recbole\n"
    ),
  )
  with pytest.raises(OSError, match="No matching distribution"):
    movielens._fetch_recbole_wheel(str(tmp_path))


def test_a_cache_filled_concurrently_is_used(tmp_path, tiny_counts):
  cache = tmp_path / "cache"

  def racing(destination):
    _write(pathlib.Path(destination), _atomic_files())
    # Another process finishes first and publishes its own copy.
    _write(cache / "ml-100k", _grouplens_files())

  folder = movielens.locate_raw("", str(cache), [("slow", racing)])
  assert sorted(os.listdir(folder)) == sorted(_grouplens_files())
  assert os.listdir(cache) == ["ml-100k"]
