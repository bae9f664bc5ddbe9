"""A small dataset with planted multi-facet structure, generated in memory.

Every item has `num_facets` facets (think genre, brand), each taking one of
`values_per_facet` values. Every user likes `liked_values` values within each
facet (action AND musicals). A user's next item is, with probability
`1 - noise`, an item whose facet values are all liked by the user, where the
value of facet 0 cycles through the user's liked values in order (a sequential
pattern) and the other facets are drawn among the liked values; otherwise it is
a uniformly random item. A model that reads the history can infer the liked
values per facet; popularity cannot.
"""

from __future__ import annotations

import ml_collections
import numpy as np


def generate(cfg: ml_collections.ConfigDict, seed: int) -> tuple[list[np.ndarray], int]:
  """Returns (sequences of item ids in 1..num_items, num_items)."""
  rng = np.random.default_rng([seed, 20250311])
  num_items, num_facets, num_values = cfg.num_items, cfg.num_facets, cfg.values_per_facet
  if not 1 <= cfg.liked_values <= num_values:
    raise ValueError("config.data.synthetic.liked_values must be in [1, values_per_facet]")
  if not 2 <= cfg.min_len <= cfg.max_len:
    raise ValueError("config.data.synthetic: need 2 <= min_len <= max_len")
  # Item facets; every value combination gets at least one item.
  combos = num_values ** num_facets
  if num_items < combos:
    raise ValueError(f"config.data.synthetic.num_items must be >= values_per_facet ** num_facets "
                     f"= {combos}")
  codes = np.concatenate([np.arange(combos), rng.integers(0, combos, num_items - combos)])
  rng.shuffle(codes)
  items_by_code = {c: np.flatnonzero(codes == c) + 1 for c in range(combos)}

  sequences = []
  for _ in range(cfg.num_users):
    liked = [rng.choice(num_values, cfg.liked_values, replace=False) for _ in range(num_facets)]
    length = int(rng.integers(cfg.min_len, cfg.max_len + 1))
    cycle_pos = int(rng.integers(cfg.liked_values))
    seq = []
    for _ in range(length):
      if rng.random() < cfg.noise:
        seq.append(int(rng.integers(1, num_items + 1)))
        continue
      values = [liked[0][cycle_pos % cfg.liked_values]]
      values += [int(rng.choice(liked[f])) for f in range(1, num_facets)]
      cycle_pos += 1
      code = sum(int(v) * num_values ** f for f, v in enumerate(values))
      seq.append(int(rng.choice(items_by_code[code])))
    sequences.append(np.asarray(seq, dtype=np.int32))
  return sequences, num_items
