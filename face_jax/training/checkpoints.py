"""Orbax checkpoints of a training stage and atomic JSON markers.

Checkpoints are written sharded (each process writes the shards its
devices hold) and restored into the layout of the target, whatever mesh
wrote them: restoring onto 4 devices or 1 a run saved on 8 only needs a
target laid out on the new mesh (`face_jax.parallel.abstract_target`, or a
state created there). Tables padded to a shard count (see
`face_jax.models.backbones`) change their row count with the mesh; their
extra rows are zeros, so restoring crops or zero-fills them.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from face_jax.parallel.sharding import path_string

# Written atomically in a stage's folder when the stage has finished; holds
# the stage's results. A stage whose marker exists is not run again.
RESULT_FILE = "result.json"


def write_json_atomic(path: str | pathlib.Path, payload: Any) -> None:
  """Writes JSON so that readers see the old file or the whole new one."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  descriptor, temporary = tempfile.mkstemp(
    dir=path.parent, prefix=f".{path.name}."
  )
  try:
    with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
      json.dump(payload, stream, indent=2, sort_keys=True)
      stream.write("\n")
    os.replace(temporary, path)
  except BaseException:
    os.unlink(temporary)
    raise


def read_json(path: str | pathlib.Path) -> Any | None:
  """The JSON content of `path`, or None when the file does not exist."""
  path = pathlib.Path(path)
  if not path.exists():
    return None
  return json.loads(path.read_text(encoding="utf-8"))


class CheckpointError(ValueError):
  """A checkpoint that does not fit the state it is restored into."""


def abstract_like(tree: Any) -> Any:
  """Shapes, dtypes and shardings of `tree`, a restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _resized_rows(saved: Any, target: Any) -> list[str]:
  """Leaves whose row count (axis 0) differs between checkpoint and target.

  Raises:
    CheckpointError: for a leaf whose other dimensions or rank differ.
  """
  # Paths as "opt_state/1/mu/user": the metadata holds dicts and lists
  # where the state holds dataclasses and named tuples.
  saved_shapes = {
    path_string(path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(saved)
  }
  resized = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(target):
    name = path_string(path)
    want = tuple(leaf.shape)
    have = saved_shapes.get(name)
    if have is None or have == want:
      continue  # Missing leaves are orbax's to report.
    if len(have) != len(want) or not want or have[1:] != want[1:]:
      raise CheckpointError(
        f"Checkpoint array {name} has shape {have}, the state expects "
        f"{want}; restore with the config that wrote the checkpoint."
      )
    resized.append(f"{name} {have[0]} -> {want[0]} rows")
  return resized


class EpochCheckpoints:
  """Keeps the latest epoch (to resume) and the best epoch (to score).

  Each epoch is saved once, under its 1-based number, with the train state
  and the loop's bookkeeping (a JSON dict). Orbax keeps the latest epoch and
  the most recent epoch saved with `improved=True`, which is the best one
  because an epoch only counts as improved when it beats every earlier one.

  Args:
    directory: folder of the step subfolders; created when missing.
    async_save: write in a background thread; `close` waits for it.
  """

  def __init__(self, directory: str | pathlib.Path, async_save: bool = True):
    keep = checkpoint_managers.AnyPreservationPolicy(
      [
        checkpoint_managers.LatestN(n=1),
        checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics["improved_epoch"], n=1
        ),
      ]
    )
    self._manager = ocp.CheckpointManager(
      pathlib.Path(directory).absolute(),
      options=ocp.CheckpointManagerOptions(
        preservation_policy=keep,
        enable_async_checkpointing=async_save,
      ),
      # Handlers named up front, so that the metadata of a checkpoint
      # written by an earlier run can be read before restoring it.
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "loop": ocp.JsonCheckpointHandler(),
      },
    )

  def latest_epoch(self) -> int | None:
    return self._manager.latest_step()

  def save(self, epoch: int, state: Any, loop: dict, improved: bool) -> None:
    """Saves `state` and `loop` as epoch `epoch` (asynchronously)."""
    # The next train step donates the state's buffers; the background write
    # reads from its own copies.
    state = jax.tree.map(lambda leaf: jnp.array(leaf, copy=True), state)
    self._manager.save(
      epoch,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop)
      ),
      metrics={"improved_epoch": epoch if improved else -1},
    )

  def restore(self, epoch: int, target: Any) -> tuple[Any, dict]:
    """Restores epoch `epoch` into `target`'s structure and placement.

    Each array is read straight into the target's sharding (each device
    reads its own slice), so the mesh may differ from the one that saved.
    Arrays whose row count differs (tables padded for another shard count)
    are cropped or zero-filled at the end; any other shape difference is
    an error.

    Args:
      epoch: a saved epoch.
      target: a state, or `jax.ShapeDtypeStruct`s with shardings (for
        example `face_jax.parallel.abstract_target`).

    Returns:
      (state, loop bookkeeping).

    Raises:
      CheckpointError: an array's shape differs beyond its row count.
    """
    target = abstract_like(target)
    saved = self._manager.item_metadata(epoch).state
    resized = _resized_rows(saved, target)
    if resized:
      logging.info(
        "Epoch %d: padded rows resized for this mesh: %s.",
        epoch,
        "; ".join(resized),
      )
    restored = self._manager.restore(
      epoch,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target, strict=not resized),
        loop=ocp.args.JsonRestore(),
      ),
    )
    return restored.state, restored.loop

  def wait(self) -> None:
    """Blocks until every pending write is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending writes, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
