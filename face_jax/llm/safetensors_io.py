"""Reads safetensors checkpoints through memory maps, one tensor at a time.

A tensor comes back as a read-only numpy view of the mapped file, so reading
a checkpoint costs no memory beyond the page cache until a tensor is
converted (transposed or cast) on its way to a device. bfloat16 tensors are
read with `ml_dtypes`, which the `safetensors` package's numpy reader lacks.

The format: an 8-byte little-endian header length N, N bytes of JSON mapping
each tensor name to its dtype, shape and byte range, then the data.
"""

from __future__ import annotations

import json
import pathlib
import struct

import ml_dtypes
import numpy as np

# safetensors dtype names -> little-endian numpy dtypes.
_DTYPES = {
  "F64": np.dtype("<f8"),
  "F32": np.dtype("<f4"),
  "F16": np.dtype("<f2"),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype("<i8"),
  "I32": np.dtype("<i4"),
  "I16": np.dtype("<i2"),
  "I8": np.dtype("i1"),
  "U8": np.dtype("u1"),
  "BOOL": np.dtype("?"),
}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A checkpoint folder or file is missing or malformed."""


def _read_header(path: pathlib.Path) -> tuple[dict, int]:
  """Returns (tensor entries, byte offset of the data section)."""
  with path.open("rb") as f:
    raw_length = f.read(8)
    if len(raw_length) != 8:
      raise CheckpointError(f"{path} is too short to be a safetensors file.")
    (length,) = struct.unpack("<Q", raw_length)
    if length > path.stat().st_size - 8:
      raise CheckpointError(
        f"{path} declares a {length}-byte header, longer than the file; "
        "the file is truncated or not safetensors."
      )
    header = json.loads(f.read(length))
  header.pop("__metadata__", None)
  return header, 8 + length


class SafetensorsFile:
  """One safetensors file, memory-mapped on first tensor access."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.entries, self._data_start = _read_header(path)
    self._mapped: np.memmap | None = None

  def get(self, name: str) -> np.ndarray:
    """Returns tensor `name` as a read-only view of the mapped file."""
    entry = self.entries[name]
    if entry["dtype"] not in _DTYPES:
      raise CheckpointError(
        f"{self.path}: tensor {name} has dtype {entry['dtype']}; supported "
        f"dtypes are {sorted(_DTYPES)}."
      )
    if self._mapped is None:
      self._mapped = np.memmap(self.path, dtype=np.uint8, mode="r")
    begin, end = entry["data_offsets"]
    raw = self._mapped[self._data_start + begin : self._data_start + end]
    return raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


class Checkpoint:
  """The tensors of a model folder: one file or shards listed by an index.

  Attributes:
    folder: the model folder.
    files: the safetensors files, in the order they were found.
  """

  def __init__(self, folder: pathlib.Path):
    self.folder = folder
    index_path = folder / INDEX_FILE
    if index_path.is_file():
      weight_map = json.loads(index_path.read_text())["weight_map"]
      file_names = sorted(set(weight_map.values()))
    elif (folder / SINGLE_FILE).is_file():
      file_names = [SINGLE_FILE]
    else:
      file_names = sorted(p.name for p in folder.glob("*.safetensors"))
    if not file_names:
      raise CheckpointError(
        f"No safetensors weights in {folder} (looked for {INDEX_FILE}, "
        f"{SINGLE_FILE} and *.safetensors); convert PyTorch .bin weights "
        "with transformers' save_pretrained(safe_serialization=True)."
      )
    self.files = []
    self._where: dict[str, SafetensorsFile] = {}
    for file_name in file_names:
      path = folder / file_name
      if not path.is_file():
        raise CheckpointError(
          f"{index_path} lists {file_name}, which is not in {folder}; the "
          "download is incomplete."
        )
      shard = SafetensorsFile(path)
      self.files.append(shard)
      for name in shard.entries:
        self._where[name] = shard

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def names(self) -> list[str]:
    """All tensor names in the checkpoint, sorted."""
    return sorted(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._where[name].entries[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    """Returns tensor `name` as a read-only memory-mapped numpy array."""
    if name not in self._where:
      raise CheckpointError(
        f"Tensor {name} is not in the checkpoint at {self.folder}."
      )
    return self._where[name].get(name)
