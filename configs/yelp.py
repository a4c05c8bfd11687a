"""Yelp (RLMRec split) with the authors' hyperparameters.

Point `--config.data.dir` at the RLMRec folder (trn_mat.pkl, val_mat.pkl,
tst_mat.pkl and, when present, usr_prf.pkl and itm_prf.pkl).
"""

from configs import backbone_defaults, base


def get_config():
  config = base.get_base_config()
  # Dataset name in logs, results and the workdir name.
  config.data.name = "yelp"
  # A folder of RLMRec pickles.
  config.data.source = "rlmrec"
  # The RLMRec Yelp folder.
  config.data.dir = "~/.cache/face_jax/yelp"
  # Items are businesses, mostly restaurants, in the alignment prompt.
  config.data.item_noun = "restaurant"
  backbone_defaults.follow_backbone(config, backbone_defaults.authors_table())
  config.lock()
  return config
