"""MovieLens-100K: the built-in default dataset, fetched by face_jax."""

from configs import base


def get_config():
  config = base.get_base_config()
  config.data.name = "movielens"
  config.data.source = "movielens"
  config.data.item_noun = "movie"
  config.lock()
  return config
