"""Short English profiles from generic item metadata records.

Item profiles name the item and list its informative fields (genres, tags,
developer, ...). A user's profile names a few of the user's TRAIN items and
the most common values of the aggregated fields over those items; callers
pass train items only, which keeps validation and test items out of it.
Texts stay short because the text encoder reads at most 256 tokens.
"""

from __future__ import annotations

import collections
import html
import re
from collections.abc import Mapping, Sequence

# Keys that hold the item's name, in order of preference.
TITLE_KEYS = ("title", "name", "app_name", "item_name", "product_name")
# String fields that repeat across items and so say something about a user.
MAKER_KEYS = (
  "developer",
  "publisher",
  "brand",
  "author",
  "artist",
  "director",
  "creator",
  "studio",
  "manufacturer",
  "category",
)
MAX_LIST_VALUES = 8
MAX_STRING_CHARS = 200
MAX_USER_TITLES = 6
MAX_USER_VALUES = 5


def field_values(value, explicit: bool) -> list[str]:
  """The text values of one metadata field, or [] if it is not textual.

  Args:
    value: a metadata value (string, list of strings, number, ...).
    explicit: the field was asked for by name, so numbers count as text.

  Returns:
    Cleaned, de-duplicated strings in their original order.
  """
  if isinstance(value, str):
    values = [value]
  elif isinstance(value, (list, tuple)):
    values = [v for v in value if isinstance(v, str)]
  elif (
    explicit and isinstance(value, (int, float)) and not isinstance(value, bool)
  ):
    values = [f"{value:g}"]
  else:
    return []
  cleaned = []
  for text in values:
    # Scraped metadata often keeps HTML entities ("Heroes &amp; Generals").
    text = re.sub(r"\s+", " ", html.unescape(text)).strip()
    if len(text) > MAX_STRING_CHARS:
      text = text[:MAX_STRING_CHARS].rsplit(" ", 1)[0] + "..."
    if not text or text in cleaned:
      continue
    # Links and bare numbers (ids, codes) are not descriptive text.
    if not explicit and (
      text.startswith(("http://", "https://")) or text.isdigit()
    ):
      continue
    cleaned.append(text)
  return cleaned


def label(key: str) -> str:
  """'release_date' -> 'Release date'."""
  words = key.replace("_", " ").replace("-", " ").strip()
  return words[:1].upper() + words[1:]


def join_words(words: Sequence[str]) -> str:
  """['a', 'b', 'c'] -> 'a, b and c'."""
  if len(words) <= 1:
    return "".join(words)
  return f"{', '.join(words[:-1])} and {words[-1]}"


def item_title(record: Mapping | None) -> str:
  """The first non-empty title-like field of a record, else ''."""
  for key in TITLE_KEYS:
    values = field_values((record or {}).get(key), explicit=False)
    if values:
      return values[0]
  return ""


def describe_item(
  record: Mapping | None,
  fields: Sequence[str] | None,
  id_key: str,
  noun: str,
) -> str:
  """One item's profile, for example "Portal 2 is a game. Genres: Action.".

  Args:
    record: the item's metadata, or None when it has none.
    fields: fields to use, in this order; None picks every string or list
      of strings field except the id, links and bare numbers.
    id_key: the record's id field, never described.
    noun: what an item is ("game", "book", "item").

  Returns:
    A few short sentences.
  """
  if not record:
    return f"A {noun} with no description."
  title = item_title(record)
  explicit = fields is not None
  keys = list(fields) if explicit else list(record)
  sentences = [f"{title} is {_article(noun)} {noun}."] if title else []
  for key in keys:
    if key == id_key or key in TITLE_KEYS:
      continue
    values = field_values(record.get(key), explicit)
    values = [v for v in values if v != title][:MAX_LIST_VALUES]
    if values:
      sentences.append(f"{label(key)}: {join_words(values)}.")
  if not sentences:
    return f"A {noun} with no description."
  if not title:
    sentences.insert(0, f"{_article(noun).capitalize()} {noun}.")
  return " ".join(sentences)


def user_fields(
  records: Sequence[Mapping], fields: Sequence[str] | None, id_key: str
) -> list[str]:
  """Fields worth aggregating into user profiles.

  Those whose values are lists (genres, tags) and the maker-like string
  fields (developer, publisher, brand...), among `fields` when given.

  Args:
    records: all metadata records.
    fields: the item text fields, or None for automatic.
    id_key: the id field, never used.

  Returns:
    Field names in first-seen order.
  """
  seen: dict[str, None] = {}
  for record in records:
    for key, value in record.items():
      if key == id_key or key in TITLE_KEYS or key in seen:
        continue
      if fields is not None and key not in fields:
        continue
      if isinstance(value, (list, tuple)) or key in MAKER_KEYS:
        seen[key] = None
  if fields is not None:
    return [key for key in fields if key in seen]
  return list(seen)


def describe_user(
  train_records: Sequence[Mapping | None],
  train_popularity: Sequence[int],
  aggregate: Sequence[str],
  noun: str,
) -> str:
  """A user's profile from that user's TRAIN items only.

  Args:
    train_records: metadata of the user's train items (None: no metadata).
    train_popularity: train interaction count of each of those items; the
      best-known titles are named first.
    aggregate: fields whose most common values are listed.
    noun: what an item is.

  Returns:
    For example "This user likes games such as Portal 2 and Dota 2. Most
    common genres: Action and Indie."
  """
  order = sorted(
    range(len(train_records)), key=lambda i: -int(train_popularity[i])
  )
  titles = []
  for index in order:
    title = item_title(train_records[index])
    if title and title not in titles:
      titles.append(title)
    if len(titles) == MAX_USER_TITLES:
      break
  count = len(train_records)
  plural = noun if count == 1 else f"{noun}s"
  if titles:
    sentences = [
      f"This user liked {count} {plural}, such as {join_words(titles)}."
    ]
  else:
    sentences = [f"This user liked {count} {plural}."]
  for key in aggregate:
    counts = collections.Counter(
      value
      for record in train_records
      if record
      for value in field_values(record.get(key), explicit=False)
    )
    # "Most common" means shared by two or more items, once there are a few;
    # one-off values (a single game's developer) would crowd the text.
    least = 2 if count >= 3 else 1
    common = [value for value in counts if counts[value] >= least]
    if not common:
      continue
    top = sorted(common, key=lambda v: (-counts[v], v))[:MAX_USER_VALUES]
    sentences.append(f"Most common {label(key).lower()}: {join_words(top)}.")
  return " ".join(sentences)


def _article(word: str) -> str:
  return "an" if word[:1].lower() in "aeiou" else "a"
