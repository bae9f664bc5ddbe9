"""FAME on Beauty (leave-one-out, full ranking); everything else from default.py."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns the Beauty configuration."""
  config = default.get_config()
  config.data.name = "Beauty"  # Reads $FAME_DATA_DIR/Beauty.txt.
  return config
