"""MovieLens-100K: the built-in default dataset, fetched by face_jax.

The authors did not train on MovieLens; it takes their Amazon-book values.
Pick the backbone with `--config.model.backbone=...`.
"""

from configs import backbone_defaults, base


def get_config():
  config = base.get_base_config()
  # Dataset name in logs, results and the workdir name.
  config.data.name = "movielens"
  # Fetched and split by face_jax (data.dir may point at a local ml-100k).
  config.data.source = "movielens"
  # Items are movies in the alignment prompt.
  config.data.item_noun = "movie"
  backbone_defaults.follow_backbone(config, backbone_defaults.authors_table())
  config.lock()
  return config
