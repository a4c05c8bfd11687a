"""A tiny, fast config for tests: small tables, few epochs, no extras.

The tests hand the dataset over directly (`train_and_evaluate(...,
dataset=...)`); data.dir only matters when a tiny RLMRec folder is given.
"""

from configs import backbone_defaults, base


def get_config():
  config = base.get_base_config()
  # Dataset name in logs, results and the workdir name.
  config.data.name = "tiny"
  # A folder of RLMRec pickles.
  config.data.source = "rlmrec"
  # MF needs no graph, so the tiny run works with any backbone set.
  config.model.backbone = "mf"
  # Small embeddings keep every step fast.
  config.model.embed_dim = 8
  # Small batches make several steps per epoch on tiny data.
  config.pretrain.batch_size = 16
  # Stop early so that a test run takes seconds.
  config.pretrain.patience = 2
  # Check the loss every few steps.
  config.pretrain.log_every = 4
  # A few users per evaluation batch, so that batching is exercised.
  config.eval.batch_size = 8
  # No progress bar in test logs.
  config.log.progress_bar = False
  # No event files in test folders.
  config.log.tensorboard = False
  table = backbone_defaults.authors_table()
  for entry in table.values():
    # At most a few epochs for every backbone.
    entry.pretrain.max_epochs = 4
    # Shallow graphs for the graph backbones.
    entry.model.num_layers = min(entry.model.num_layers, 1)
  backbone_defaults.follow_backbone(config, table)
  config.lock()
  return config
