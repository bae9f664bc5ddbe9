"""A small in-memory dataset with planted facets: the whole pipeline in minutes on a CPU."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns the synthetic configuration (no files needed)."""
  config = default.get_config()
  config.data.name = "synthetic"  # Generated from config.data.synthetic; no file read.
  config.data.max_len = 20  # Generated sequences are short.
  config.data.length_buckets = (8, 0)  # Two static shapes.
  config.batch_size = 128  # Smaller batches for a small dataset.
  config.num_epochs = 30  # Enough for the planted structure to be learnt.
  config.model.dropout = 0.2  # Less regularisation for a small, clean dataset.
  config.model.attention_dropout = 0.2  # Same.
  config.early_stop_patience = 5  # Shorter patience for a short run.
  return config
