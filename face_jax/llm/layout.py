"""Logical axes of the frozen LLM's weights, by parameter path.

`load_llm(config.llm, shardings=parallel.sharding_by_path(mesh, rules,
WEIGHT_AXES))` places each tensor on its devices as it is read, so that a
7B model never sits whole on one device: the token table split by
vocabulary rows, attention projections by their head features, and the
feed-forward layers by their hidden units (Megatron-style: the input
projections by output features, the output projections by input
features). Norms, biases of the output projections and position tables are
small and replicated. The paths are those of `face_jax.llm.bert` and
`face_jax.llm.decoder`.
"""

from __future__ import annotations

# (regular expression over "/"-joined parameter paths, logical axes); the
# first match wins.
WEIGHT_AXES = (
  (r"(word_embeddings|embed_tokens)/embedding", ("vocab", "embed")),
  (r".*attention/(query|key|value)/kernel", ("embed", "heads")),
  (r".*attention/(query|key|value)/bias", ("heads",)),
  (r".*attention/out/kernel", ("heads", "embed")),
  (r".*mlp_(gate|up|in)/kernel", ("embed", "mlp")),
  (r".*mlp_(gate|up|in)/bias", ("mlp",)),
  (r".*mlp_(down|out)/kernel", ("mlp", "embed")),
  (r".*", None),
)
