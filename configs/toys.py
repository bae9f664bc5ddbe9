"""FAME on Toys_and_Games (leave-one-out, full ranking); everything else from default.py."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns the Toys_and_Games configuration."""
  config = default.get_config()
  config.data.name = "Toys_and_Games"  # Reads $FAME_DATA_DIR/Toys_and_Games.txt.
  return config
