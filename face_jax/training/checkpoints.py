"""Orbax checkpoints of a training stage and atomic JSON markers."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

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


def abstract_like(tree: Any) -> Any:
  """Shapes, dtypes and shardings of `tree`, a restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


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
      item_names=("state", "loop"),
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

    Args:
      epoch: a saved epoch.
      target: a state or its `abstract_like` description.

    Returns:
      (state, loop bookkeeping).
    """
    restored = self._manager.restore(
      epoch,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_like(target)),
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
