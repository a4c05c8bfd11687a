"""The user-item graph and sparse propagation over it."""

from face_jax.graph.adjacency import (
  PATHS,
  Block,
  Graph,
  Operator,
  build_graph,
  compact,
  dropped_operator,
  full_operator,
  masked_operator,
  normalized_matrix,
)
from face_jax.graph.propagation import (
  PROPAGATION_OPTIONS,
  layer_sum,
  layer_sum_rows,
  layers,
  propagate,
  resolve_path,
  restrict_columns,
  spmm,
  spmm_rows,
)

__all__ = [
  "PATHS",
  "PROPAGATION_OPTIONS",
  "Block",
  "Graph",
  "Operator",
  "build_graph",
  "compact",
  "dropped_operator",
  "full_operator",
  "layer_sum",
  "layer_sum_rows",
  "layers",
  "masked_operator",
  "normalized_matrix",
  "propagate",
  "resolve_path",
  "restrict_columns",
  "spmm",
  "spmm_rows",
]
