"""FAME on Yelp (leave-one-out, full ranking); everything else from default.py."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns the Yelp configuration."""
  config = default.get_config()
  config.data.name = "Yelp"  # Reads $FAME_DATA_DIR/Yelp.txt.
  return config
