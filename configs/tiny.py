"""A tiny, fast config for tests: small tables, few epochs, no extras.

The tests hand the dataset over directly (`train_and_evaluate(...,
dataset=...)`); data.dir only matters when a tiny RLMRec folder is given.
The FACE stages use all-MiniLM-L6-v2 unless a test points llm.model at a
smaller model folder (the end-to-end tests write a tiny random BERT with
MiniLM's tokenizer).
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
  # Few words per entity, so that even a tiny vocabulary has plenty.
  config.face.num_words = 4
  # Narrow words and layers keep the FACE steps fast.
  config.face.word_dim = 16
  # Narrow feed-forward blocks in the FACE encoder and decoder.
  config.face.ff_dim = 32
  # Several chunks of the tiny codebook per search, so chunking runs.
  config.face.chunk_size = 64
  # Small map batches make several steps per epoch on tiny data.
  config.map.batch_size = 16
  # Stop early so that a test run takes seconds.
  config.map.patience = 2
  # Check the loss every few steps.
  config.map.log_every = 4
  # Small align batches (each row is an LLM sentence).
  config.align.batch_size = 8
  # A few align steps per epoch.
  config.align.steps_per_epoch = 3
  # Stop early so that a test run takes seconds.
  config.align.patience = 2
  # Check the loss every step.
  config.align.log_every = 1
  # A few entities per FACE call, so that batching is exercised.
  config.descriptors.batch_size = 16
  # A few sentences per LLM call, so that batching is exercised.
  config.descriptors.encode_batch_size = 16
  # Profiles of the synthetic test texts are short.
  config.llm.max_length = 64
  # A few texts per LLM call.
  config.llm.batch_size = 16
  # The 300 most frequent nouns and adjectives: a small codebook.
  config.vocab.size = 300
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
    # Two map epochs.
    entry.map.max_epochs = 2
    # Two align epochs.
    entry.align.max_epochs = 2
    # Shallow graphs for the graph backbones.
    entry.model.num_layers = min(entry.model.num_layers, 1)
  backbone_defaults.follow_backbone(config, table)
  config.lock()
  return config
