"""Scale-out: device mesh, logical axis rules, sharded init and search.

Model code names logical axes ("batch", "users", "items", "vocab", "embed",
...); `config.mesh.rules` maps them onto the axes of the mesh that
`make_mesh(config.mesh)` builds. See each module for how the steps use it.
"""

from face_jax.parallel.distributed import (
  is_main_process,
  maybe_initialize,
  quiet_other_processes,
  sync_processes,
)
from face_jax.parallel.memory import (
  MemoryReport,
  compile_and_log,
  log_memory_analysis,
  memory_report,
)
from face_jax.parallel.mesh import (
  ShardingError,
  make_mesh,
  mesh_axis_size,
  resolve_mesh_shape,
)
from face_jax.parallel.rules import (
  LogicalAxes,
  Rules,
  check_rules,
  current_context,
  logical_to_spec,
  named_sharding,
  pad_rows_to,
  round_up,
  shard_count,
  use_mesh,
  with_logical_constraint,
)
from face_jax.parallel.search import (
  NO_INDEX,
  merge_candidates,
  sharded_top_w,
  vocab_top_w,
)
from face_jax.parallel.sharding import (
  abstract_target,
  is_logical_axes,
  logical_axes_by_path,
  place_global,
  shard_tree,
  sharded_init,
  sharding_by_path,
  to_host,
  tree_shardings,
)

__all__ = [
  "NO_INDEX",
  "LogicalAxes",
  "MemoryReport",
  "Rules",
  "ShardingError",
  "abstract_target",
  "check_rules",
  "compile_and_log",
  "current_context",
  "is_logical_axes",
  "is_main_process",
  "log_memory_analysis",
  "logical_axes_by_path",
  "logical_to_spec",
  "make_mesh",
  "maybe_initialize",
  "memory_report",
  "merge_candidates",
  "mesh_axis_size",
  "named_sharding",
  "pad_rows_to",
  "place_global",
  "quiet_other_processes",
  "resolve_mesh_shape",
  "round_up",
  "shard_count",
  "shard_tree",
  "sharded_init",
  "sharded_top_w",
  "sharding_by_path",
  "sync_processes",
  "to_host",
  "tree_shardings",
  "use_mesh",
  "vocab_top_w",
  "with_logical_constraint",
]
