"""FLOPs that the real tokens of an epoch need: the numerator of a step's matmul efficiency.

Only matmul FLOPs count (a multiply-add is 2 FLOPs); embedding lookups,
LayerNorm, softmax, GELU, the log-sum-exp and the optimizer do not. Padding
positions, which a step does compute, do not count either, so the rate this
gives is a lower bound on what the hardware executes. `tests/test_flops.py`
checks the count against the `dot_general`s of the model's own jaxpr.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

from fame_jax import data as data_lib
from fame_jax import model as model_lib


@dataclasses.dataclass(frozen=True)
class TokenStats:
  """What a set of training batches asks of the model."""
  steps: int
  tokens_in: int  # T: non-padding input positions.
  tokens_target: int  # Y: positions with a loss (target > 0).
  attended_pairs: int  # S: (query, key) pairs of real tokens, causal: n(n+1)/2 a sequence.

  @classmethod
  def of_lengths(cls, lengths: np.ndarray, tokens_target: int, steps: int) -> "TokenStats":
    lengths = np.asarray(lengths, np.int64)
    return cls(steps=steps, tokens_in=int(lengths.sum()), tokens_target=int(tokens_target),
               attended_pairs=int((lengths * (lengths + 1) // 2).sum()))

  @classmethod
  def of_windows(cls, windows: data_lib.Windows, steps: int) -> "TokenStats":
    """An epoch over `windows` in `steps` steps; packing or bucketing changes none of it."""
    return cls.of_lengths(windows.lengths, windows.num_targets, steps)

  @classmethod
  def of_batches(cls, batches: Iterable[dict[str, np.ndarray]]) -> "TokenStats":
    """Batches as `data.BatchPlan.make_batch` builds them, padded or packed."""
    batches = list(batches)
    lengths = np.concatenate([sequence_lengths(b) for b in batches])
    return cls.of_lengths(lengths, sum(int((b["targets"] > 0).sum()) for b in batches),
                          len(batches))


def sequence_lengths(batch: dict[str, np.ndarray]) -> np.ndarray:
  """Lengths of the sequences of a batch, padded (one per row) or packed (`segments`)."""
  items = batch["items"]
  segments = batch.get("segments", (items > 0).astype(np.int32))
  width = int(segments.max()) + 1
  keys = (np.arange(items.shape[0])[:, None] * width + segments).reshape(-1)
  counts = np.bincount(keys, minlength=items.shape[0] * width).reshape(items.shape[0], width)
  counts = counts[:, 1:].reshape(-1)
  return counts[counts > 0]


def forward_flops(cfg: model_lib.ModelConfig, t: TokenStats) -> dict[str, float]:
  """Forward FLOPs of FAME / SASRec on the real tokens, by component.

  T = real input tokens, S = attended (query, key) pairs of real tokens,
  Y = positions with a target, B = training steps, d = hidden, H = heads,
  d' = d/H, N = experts, f = FFN inner size, f' = FFN' inner size, V = catalogue
  size, K user vectors of size D per position (K = 1, D = d for SASRec and FAME
  "logit_sum"; K = H, D = d' for FAME "mixture_of_softmax", scored against the
  per-head item tables E W_f^(h)).
  Per standard block:
      Q,K,V,O projections      8 T d^2
      scores + weighted sum    4 S d
      FFN                      4 T d f
  FAME layer (all H heads):
      shared K, V              4 T d^2               (H * 2 * 2 d d')
      N expert queries         2 T d^2 N             (H * 2 d N d')
      expert attention         4 S d N               (H * N * (2 S d' + 2 S d'))
      router (Eq. 16)          2 T d N^2             (H * 2 (N d') N)
      expert mixture (Eq. 17)  2 T d N
      FFN' (shared by heads)   4 T d f'              (H * 4 d' f')
      gate (Eq. 10)            2 T d H
      item projection (Eq. 9)  2 T d^2               ("logit_sum": user side, H * 2 d' d)
                               2 B V d^2             ("mixture_of_softmax": the per-head
                                                      item tables E W_f^(h), once a step)
      head combination         2 T d H               ("logit_sum" only)
  Output layer (full catalogue)  2 Y D V K = 2 Y d V  (every model and rule)
  """
  d, h, n, v = cfg.hidden_size, cfg.num_heads, cfg.num_experts, cfg.num_items
  T, S, Y = t.tokens_in, t.attended_pairs, t.tokens_target  # pylint: disable=invalid-name
  fame = cfg.name == "fame"
  num_standard = cfg.num_layers - (1 if fame else 0)
  out = {
      "standard_blocks": num_standard * (8 * T * d * d + 4 * S * d + 4 * T * d * cfg.ffn_size),
      "output_layer": 2 * Y * cfg.vector_size * v * cfg.num_vectors,
  }
  if fame:
    out["fame_layer"] = (4 * T * d * d + 2 * T * d * d * n + 4 * S * d * n + 2 * T * d * n * n
                         + 2 * T * d * n + 4 * T * d * cfg.head_ffn_size + 2 * T * d * h
                         + (2 * t.steps * v * d * d if cfg.per_head_tables
                            else 2 * T * d * d + 2 * T * d * h))
  return {key: float(x) for key, x in out.items()}


def train_flops(cfg: model_lib.ModelConfig, t: TokenStats) -> dict[str, float]:
  """Forward + backward = 3 x forward (the backward: gradients of inputs and of weights)."""
  out = {k: 3.0 * x for k, x in forward_flops(cfg, t).items()}
  out["total"] = sum(out.values())
  return out
