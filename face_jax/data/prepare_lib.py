"""Turns a user's own interactions and item metadata into an RLMRec folder.

Input: interactions as CSV/TSV with a header, or JSON Lines (optionally
gzipped), with user, item and optionally timestamp columns; item metadata as
JSON Lines with an id field. Output folder: trn_mat.pkl, val_mat.pkl,
tst_mat.pkl (scipy COO, users x items), usr_prf.pkl and itm_prf.pkl
(id -> {'profile': str}), user_ids.json and item_ids.json (original id of
each dense index, as a list) and meta.json (how it was made).

Ids are kept as strings ("12" in a CSV and 12 in JSON are the same item).
Repeated (user, item) pairs collapse to one, keeping the earliest timestamp.
Dense ids follow the sorted original ids (numerically when all are
integers). Each user's items are split 3:1:1 (rounding in
`face_jax.data.split`): at random, or chronologically with `split="time"`.
Users with one or two interactions keep them in train only. User profiles
are built from train items only.

The folder is written under a temporary name beside the target and renamed
at the end, so a failure leaves no output behind.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import gzip
import io
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

import numpy as np
import scipy.sparse
from absl import logging

from face_jax.data import profiles
from face_jax.data.dataset import DataError
from face_jax.data.rlmrec import MATRIX_FILES, PROFILE_FILES
from face_jax.data.split import split_per_user

SPLITS = ("random", "time")
FORMATS = ("auto", "csv", "tsv", "jsonl")
PROGRESS_EVERY = 1_000_000
# Protocol 4 is what the RLMRec release and its readers use.
PICKLE_PROTOCOL = 4


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
  """What `prepare` reads, how it splits and where it writes.

  Attributes:
    interactions: CSV/TSV (with header) or JSONL file, optionally .gz.
    output: folder to create.
    item_meta: JSONL item metadata, or "" for none.
    input_format: "auto" (by extension), "csv", "tsv" or "jsonl".
    user_key: column/key of the user id.
    item_key: column/key of the item id.
    time_key: column/key of the timestamp (numbers or ISO dates); used
      when present, required for `split="time"`.
    meta_id_key: id key in the metadata; "" means `item_key`.
    text_fields: metadata fields for item text, in order; empty picks
      every string or list-of-strings field.
    user_fields: fields aggregated into user text; empty picks list fields
      and maker fields (developer, publisher, brand, ...).
    item_noun: what an item is, in texts ("game").
    split: "random" or "time".
    seed: seed of the random split and of tie breaks.
    require_meta: fail if an interacted item has no metadata.
    overwrite: replace an existing non-empty output folder.
    name: dataset name written to meta.json.
    command: the command line, written to meta.json.
  """

  interactions: str
  output: str
  item_meta: str = ""
  input_format: str = "auto"
  user_key: str = "user"
  item_key: str = "item"
  time_key: str = "timestamp"
  meta_id_key: str = ""
  text_fields: tuple[str, ...] = ()
  user_fields: tuple[str, ...] = ()
  item_noun: str = "item"
  split: str = "random"
  seed: int = 0
  require_meta: bool = False
  overwrite: bool = False
  name: str = ""
  command: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Interactions:
  """Distinct interactions, densely indexed.

  Attributes:
    pairs: [n, 2] int32 distinct (user, item) dense ids.
    times: [n] float earliest timestamp of each pair, or None without a
      time column.
    user_ids: [num_users] original id of each dense user.
    item_ids: [num_items] original id of each dense item.
    rows_read: input rows before de-duplication.
  """

  pairs: np.ndarray
  times: np.ndarray | None
  user_ids: np.ndarray
  item_ids: np.ndarray
  rows_read: int


def _open_text(path: str):
  if path.endswith(".gz"):
    return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
  return open(path, encoding="utf-8", newline="")


def _format_of(path: str, requested: str) -> str:
  if requested not in FORMATS:
    raise DataError(
      f"unknown input format {requested!r}; use one of {', '.join(FORMATS)}."
    )
  if requested != "auto":
    return requested
  stem = path[:-3] if path.endswith(".gz") else path
  extension = os.path.splitext(stem)[1].lower()
  by_extension = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
  }
  if extension not in by_extension:
    raise DataError(
      f"{path}: cannot tell the format from {extension!r}; name it .csv, "
      ".tsv or .jsonl, or pass --format."
    )
  return by_extension[extension]


def _id_text(value) -> str:
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  return str(value).strip()


def _time_value(value, where: str) -> float:
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  text = str(value).strip()
  try:
    return float(text)
  except ValueError:
    pass
  try:
    moment = datetime.datetime.fromisoformat(text)
  except ValueError as error:
    raise DataError(
      f"{where}: timestamp {text!r} is neither a number nor an ISO date."
    ) from error
  if moment.tzinfo is None:
    moment = moment.replace(tzinfo=datetime.timezone.utc)
  return moment.timestamp()


def _rows(path: str, input_format: str) -> Iterator[tuple[str, dict]]:
  """Yields (location for messages, row dict) for every data row."""
  try:
    yield from _parse_rows(path, input_format)
  except (UnicodeDecodeError, gzip.BadGzipFile, csv.Error, EOFError) as error:
    raise DataError(
      f"{path}: unreadable as {input_format} ({type(error).__name__}: "
      f"{error}); give UTF-8 text, optionally gzipped."
    ) from error


def _parse_rows(path: str, input_format: str) -> Iterator[tuple[str, dict]]:
  with _open_text(path) as file:
    if input_format == "jsonl":
      for number, line in enumerate(file, start=1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as error:
          raise DataError(f"{path}:{number}: not JSON ({error}).") from error
        if not isinstance(row, dict):
          raise DataError(f"{path}:{number}: a line must be a JSON object.")
        yield f"{path}:{number}", row
    else:
      delimiter = "\t" if input_format == "tsv" else ","
      reader = csv.DictReader(file, delimiter=delimiter)
      for row in reader:
        yield f"{path}:{reader.line_num}", row


def read_interactions(options: PrepareOptions) -> Interactions:
  """Reads and de-duplicates the interaction file.

  Raises:
    DataError: the file is missing or empty, a row lacks a key, or a
      timestamp cannot be read.
  """
  path = options.interactions
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such interactions file.")
  input_format = _format_of(path, options.input_format)
  users, items, times = [], [], []
  has_time = None
  started = time.monotonic()
  for where, row in _rows(path, input_format):
    if has_time is None:
      has_time = options.time_key in row
      for key in (options.user_key, options.item_key):
        if key not in row:
          raise DataError(
            f"{where}: no {key!r} column/key (found: {', '.join(row)}); "
            "set --user_key/--item_key."
          )
    user, item = row.get(options.user_key), row.get(options.item_key)
    if user is None or item is None or "" in (_id_text(user), _id_text(item)):
      raise DataError(
        f"{where}: empty {options.user_key!r} or {options.item_key!r}."
      )
    users.append(_id_text(user))
    items.append(_id_text(item))
    if has_time:
      if row.get(options.time_key) in (None, ""):
        raise DataError(f"{where}: empty {options.time_key!r}.")
      times.append(_time_value(row[options.time_key], where))
    if len(users) % PROGRESS_EVERY == 0:
      logging.info(
        "prepare: read %d interactions (%.0f s)",
        len(users),
        time.monotonic() - started,
      )
  if not users:
    raise DataError(f"{path}: no interactions; the file is empty.")
  if options.split == "time" and not has_time:
    raise DataError(
      f"{path}: --split=time needs a {options.time_key!r} column; set "
      "--time_key or use --split=random."
    )
  return _deduplicate(users, items, times if has_time else None)


def dense_ids(ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Dense index of string ids, numbered in numeric order if all are ints.

  Args:
    ids: [n] original ids as strings.

  Returns:
    (distinct ids in dense order, [n] dense index of each input id).
  """
  unique, inverse = np.unique(np.asarray(ids, dtype=str), return_inverse=True)
  if all(re.fullmatch(r"-?[0-9]+", text) for text in unique):
    order = np.argsort([int(text) for text in unique], kind="stable")
  else:
    order = np.arange(len(unique))
  rank = np.empty(len(unique), np.int64)
  rank[order] = np.arange(len(unique))
  return unique[order], rank[inverse.reshape(-1)]


def _deduplicate(users, items, times) -> Interactions:
  user_ids, user_index = dense_ids(users)
  item_ids, item_index = dense_ids(items)
  codes = user_index * len(item_ids) + item_index
  if times is None:
    keep = np.unique(codes, return_index=True)[1]
  else:
    times = np.asarray(times, dtype=np.float64)
    # The earliest occurrence of each pair: sort by time, take the first.
    order = np.lexsort((times, codes))
    keep = order[np.unique(codes[order], return_index=True)[1]]
  pairs = np.stack([user_index[keep], item_index[keep]], axis=1)
  return Interactions(
    pairs=pairs.astype(np.int32),
    times=None if times is None else times[keep],
    user_ids=user_ids,
    item_ids=item_ids,
    rows_read=len(codes),
  )


def read_item_meta(path: str, id_key: str, wanted: set[str]) -> dict[str, dict]:
  """Metadata records of the `wanted` item ids, by id (first record wins).

  Raises:
    DataError: the file is missing, a line is not a JSON object, or no
      record has the id key.
  """
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such item metadata file.")
  records: dict[str, dict] = {}
  lines = repeated = 0
  for where, row in _rows(path, "jsonl"):
    lines += 1
    if id_key not in row:
      raise DataError(
        f"{where}: no {id_key!r} key (found: {', '.join(row)}); set "
        "--meta_id_key."
      )
    item = _id_text(row[id_key])
    if item in records:
      repeated += 1
    elif item in wanted:
      records[item] = row
  if not lines:
    raise DataError(f"{path}: no metadata records; the file is empty.")
  if repeated:
    logging.warning(
      "prepare: %d repeated metadata ids; kept the first.", repeated
    )
  logging.info(
    "prepare: metadata for %d of %d items (%d records read).",
    len(records),
    len(wanted),
    lines,
  )
  return records


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What `prepare` wrote, for callers and meta.json."""

  output: str
  num_users: int
  num_items: int
  counts: dict[str, int]
  train_only_users: int
  items_without_meta: int


def _texts(
  options: PrepareOptions,
  item_ids: np.ndarray,
  train: np.ndarray,
  num_users: int,
) -> tuple[list[str], list[str], int, list[str]]:
  """Item texts from metadata and user texts from TRAIN items only."""
  meta_id_key = options.meta_id_key or options.item_key
  fields = list(options.text_fields) or None
  records: dict[str, dict] = {}
  if options.item_meta:
    records = read_item_meta(options.item_meta, meta_id_key, set(item_ids))
  missing = [item for item in item_ids if item not in records]
  if missing and options.item_meta:
    message = (
      f"{len(missing)} of {len(item_ids)} items have no metadata in "
      f"{options.item_meta} (first: {', '.join(missing[:3])})"
    )
    if options.require_meta:
      raise DataError(f"{message}; add them or drop --require_meta.")
    logging.warning("prepare: %s; they get a generic text.", message)
  by_index = [records.get(item) for item in item_ids]
  item_text = [
    profiles.describe_item(record, fields, meta_id_key, options.item_noun)
    for record in by_index
  ]
  aggregate = list(options.user_fields) or profiles.user_fields(
    list(records.values()), fields, meta_id_key
  )
  popularity = np.bincount(train[:, 1], minlength=len(item_ids))
  starts = np.searchsorted(train[:, 0], np.arange(num_users + 1))
  user_text = []
  for user in range(num_users):
    items = train[starts[user] : starts[user + 1], 1]
    user_text.append(
      profiles.describe_user(
        [by_index[i] for i in items],
        popularity[items],
        aggregate,
        options.item_noun,
      )
    )
  return item_text, user_text, len(missing), aggregate


def _write_pickle(path: str, value) -> None:
  with open(path, "wb") as file:
    pickle.dump(value, file, protocol=PICKLE_PROTOCOL)


def _write_json(path: str, value) -> None:
  with open(path, "w", encoding="utf-8") as file:
    json.dump(value, file, ensure_ascii=False, indent=1)
    file.write("\n")


def _check_output(output: str, overwrite: bool) -> None:
  if os.path.exists(output) and not os.path.isdir(output):
    raise DataError(f"{output}: exists and is not a folder; pick another.")
  if os.path.isdir(output) and os.listdir(output) and not overwrite:
    raise DataError(
      f"{output}: folder exists and is not empty; pass --overwrite to "
      "replace it or pick another --output."
    )


def prepare(options: PrepareOptions) -> Prepared:
  """Builds the RLMRec folder described in the module docstring.

  Args:
    options: inputs, keys, split and output.

  Returns:
    Counts of what was written.

  Raises:
    DataError: bad input or an output that may not be replaced; nothing is
      left at `options.output` then (an existing folder stays as it was).
  """
  if options.split not in SPLITS:
    raise DataError(
      f"unknown split {options.split!r}; use one of {', '.join(SPLITS)}."
    )
  output = os.path.abspath(os.path.expanduser(options.output))
  _check_output(output, options.overwrite)

  interactions = read_interactions(options)
  user_ids, item_ids = interactions.user_ids, interactions.item_ids
  pairs = interactions.pairs
  order_keys = interactions.times if options.split == "time" else None
  train, valid, test = split_per_user(pairs, options.seed, order_keys)
  num_users, num_items = len(user_ids), len(item_ids)
  counts = {"train": len(train), "valid": len(valid), "test": len(test)}
  per_user = np.bincount(pairs[:, 0], minlength=num_users)
  train_only = int(np.sum(per_user < 3))
  logging.info(
    "prepare: %d rows -> %d distinct pairs of %d users x %d items; split %s; "
    "%d users with < 3 interactions kept in train only.",
    interactions.rows_read,
    len(pairs),
    num_users,
    num_items,
    counts,
    train_only,
  )
  item_text, user_text, without_meta, aggregate = _texts(
    options, item_ids, train, num_users
  )

  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(
    prefix=f".{os.path.basename(output)}.tmp-", dir=parent
  )
  try:
    for split, split_pairs in zip(
      ("train", "valid", "test"), (train, valid, test), strict=True
    ):
      matrix = scipy.sparse.coo_matrix(
        (
          np.ones(len(split_pairs), np.float64),
          (split_pairs[:, 0], split_pairs[:, 1]),
        ),
        shape=(num_users, num_items),
      )
      _write_pickle(os.path.join(staging, MATRIX_FILES[split]), matrix)
    for kind, texts in (("user", user_text), ("item", item_text)):
      _write_pickle(
        os.path.join(staging, PROFILE_FILES[kind]),
        {i: {"profile": text} for i, text in enumerate(texts)},
      )
    _write_json(os.path.join(staging, "user_ids.json"), user_ids.tolist())
    _write_json(os.path.join(staging, "item_ids.json"), item_ids.tolist())
    result = Prepared(
      output=output,
      num_users=num_users,
      num_items=num_items,
      counts=counts,
      train_only_users=train_only,
      items_without_meta=without_meta,
    )
    _write_json(
      os.path.join(staging, "meta.json"),
      _meta(options, interactions, result, aggregate),
    )
    _replace(staging, output)
  finally:
    if os.path.isdir(staging):
      shutil.rmtree(staging)
  logging.info("prepare: wrote %s", output)
  return result


def _replace(staging: str, output: str) -> None:
  """Moves the finished folder into place, replacing an old one last."""
  os.chmod(staging, 0o755)  # mkdtemp makes it private
  if not os.path.exists(output):
    os.rename(staging, output)
    return
  old = tempfile.mkdtemp(
    prefix=f".{os.path.basename(output)}.old-", dir=os.path.dirname(output)
  )
  os.rmdir(old)
  os.rename(output, old)
  os.rename(staging, output)
  shutil.rmtree(old)


def _meta(
  options: PrepareOptions,
  interactions: Interactions,
  result: Prepared,
  aggregate: Sequence[str],
) -> dict:
  return {
    "format": "rlmrec",
    "name": options.name or os.path.basename(result.output),
    "made_by": "python -m face_jax.prepare",
    "command": list(options.command) or sys.argv,
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    "interactions": os.path.abspath(options.interactions),
    "item_meta": os.path.abspath(options.item_meta)
    if options.item_meta
    else "",
    "keys": {
      "user": options.user_key,
      "item": options.item_key,
      "time": options.time_key if interactions.times is not None else "",
      "meta_id": options.meta_id_key or options.item_key,
    },
    "split": options.split,
    "seed": options.seed,
    "split_rule": (
      "per user: k = (n + 2) // 5 interactions to valid, k to test, the "
      "rest to train; users with n < 3 are train only"
    ),
    "rows_read": interactions.rows_read,
    "num_users": result.num_users,
    "num_items": result.num_items,
    "num_interactions": sum(result.counts.values()),
    "counts": result.counts,
    "train_only_users": result.train_only_users,
    "items_without_meta": result.items_without_meta,
    "text_fields": list(options.text_fields) or "auto",
    "user_fields": list(aggregate),
    "item_noun": options.item_noun,
    "user_ids": "user_ids.json[i] is the original id of user i",
    "item_ids": "item_ids.json[i] is the original id of item i",
  }
