"""FAME on Sports_and_Outdoors (leave-one-out, full ranking); everything else from default.py."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns the Sports_and_Outdoors configuration."""
  config = default.get_config()
  config.data.name = "Sports_and_Outdoors"  # Reads $FAME_DATA_DIR/Sports_and_Outdoors.txt.
  return config
