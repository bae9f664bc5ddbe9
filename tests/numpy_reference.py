"""Independent float64 NumPy references for the model, the scores and the metrics.

Written from /work/shared/FAME.md with explicit loops over heads and experts,
reading weights from the Flax parameter tree by name. Nothing here imports
fame_jax, so a shared mistake would have to be made twice.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

_erf = np.vectorize(math.erf)


def activation(name: str, x: np.ndarray) -> np.ndarray:
  if name == "gelu":  # The exact (erf) GELU.
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
  if name == "relu":
    return np.maximum(x, 0.0)
  raise ValueError(name)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
  z = np.exp(x - x.max(axis=axis, keepdims=True))
  return z / z.sum(axis=axis, keepdims=True)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
  m = x.max(axis=axis, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
  m = x.max(axis=axis, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def layer_norm(x: np.ndarray, p: dict, eps: float) -> np.ndarray:
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def dense(x: np.ndarray, p: dict) -> np.ndarray:
  return x @ p["kernel"] + p["bias"]


def masked_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, items: np.ndarray) -> np.ndarray:
  """Single-head attention of one sequence, query i over keys j <= i with items[j] > 0.

  q, k: [L, dk]; v: [L, dv]; items: [L]. Explicit loop over query positions.
  """
  length = len(items)
  out = np.zeros((length, v.shape[1]))
  for i in range(length):
    allowed = [j for j in range(i + 1) if items[j] > 0]
    logits = np.array([q[i] @ k[j] for j in allowed]) / math.sqrt(q.shape[1])
    weights = softmax(logits)
    out[i] = sum(w * v[j] for w, j in zip(weights, allowed))
  return out


def feed_forward(x: np.ndarray, p: dict, act: str, eps: float, residual: bool = True) -> np.ndarray:
  h = dense(activation(act, dense(x, p["inner"])), p["outer"])
  return layer_norm(h + x if residual else h, p["norm"], eps)


def transformer_block(x: np.ndarray, items: np.ndarray, p: dict, num_heads: int, act: str,
                      eps: float) -> np.ndarray:
  """Post-LN block: multi-head causal self-attention (concat + W_O), then the FFN."""
  a = p["attention"]
  out = np.tile(a["out"]["bias"], (len(items), 1))
  for h in range(num_heads):
    q = x @ a["query"]["kernel"][:, h] + a["query"]["bias"][h]
    k = x @ a["key"]["kernel"][:, h] + a["key"]["bias"][h]
    v = x @ a["value"]["kernel"][:, h] + a["value"]["bias"][h]
    out = out + masked_attention(q, k, v, items) @ a["out"]["kernel"][h]
  x = layer_norm(x + out, p["attention_norm"], eps)
  return feed_forward(x, p["ffn"], act, eps)


def expert_head(x: np.ndarray, items: np.ndarray, p: dict, h: int, num_experts: int):
  """Head h of the FAME layer (Eq. 14-17): returns (f^(h) [L, d'], router beta^(h) [L, N])."""
  key = x @ p["key"]["kernel"][h] + p["key"]["bias"][h]  # K^(h)
  value = x @ p["value"]["kernel"][h] + p["value"]["bias"][h]  # V^(h)
  experts = []
  for n in range(num_experts):
    query = x @ p["query"]["kernel"][h][:, n, :] + p["query"]["bias"][h][n]  # Q^(h,n)
    experts.append(masked_attention(query, key, value, items))  # f^(h,n), Eq. 14-15
  concat = np.concatenate(experts, axis=-1)  # [f^(h,1) || ... || f^(h,N)]
  beta = softmax(concat @ p["router"]["kernel"][h] + p["router"]["bias"][h])  # Eq. 16
  mixture = sum(beta[:, n:n + 1] * experts[n] for n in range(num_experts))  # Eq. 17
  return mixture, beta


def user_representation(params: dict, items: np.ndarray, cfg: Any) -> np.ndarray:
  """Input embedding and the standard blocks for one sequence: [L, d]."""
  length = len(items)
  x = params["item_embedding"]["embedding"][items] + params["position_embedding"]["embedding"][:length]
  x = layer_norm(x, params["input_norm"], cfg.layer_norm_eps)
  num_standard = cfg.num_layers - (1 if cfg.name == "fame" else 0)
  for i in range(num_standard):
    x = transformer_block(x, items, params[f"block_{i}"], cfg.num_heads, cfg.activation,
                          cfg.layer_norm_eps)
  return x


def fame_forward(params: dict, items: np.ndarray, cfg: Any) -> dict[str, np.ndarray]:
  """The whole FAME model for one sequence (items [L], 0 = padding), following FAME.md.

  Returns per position: `log_p` [L, V] (log p(v) for items 1..V), `router`
  [H, L, N], `gate` [L, H] and the per-head scores `head_scores` [L, H, V].
  """
  params = _to_numpy(params)
  x = user_representation(params, items, cfg)
  table = params["item_embedding"]["embedding"][1:cfg.num_items + 1]  # E[v], v = 1..V
  if cfg.name == "sasrec":
    return {"log_p": log_softmax(x @ table.T)}
  fl = params["fame_layer"]
  heads, routers = [], []
  for h in range(cfg.num_heads):
    mixture, beta = expert_head(x, items, fl["heads"], h, cfg.num_experts)
    # Eq. 7: FFN' shared by all heads, residual adds f^(h) (or nothing).
    heads.append(feed_forward(mixture, fl["head_ffn"], cfg.activation, cfg.layer_norm_eps,
                              residual=cfg.head_ffn_residual == "mixture"))
    routers.append(beta)
  length = len(items)
  if cfg.gate:  # Eq. 10
    gate = softmax(np.concatenate(heads, axis=-1) @ params["gate"]["kernel"] + params["gate"]["bias"])
  else:
    gate = np.full((length, cfg.num_heads), 1.0 / cfg.num_heads)
  # Eq. 9 and 8: item embeddings projected into every head's subspace, one score per head.
  head_scores = np.stack(
      [heads[h] @ (table @ params["item_projection"][h]).T for h in range(cfg.num_heads)], axis=1)
  if cfg.combine == "logit_sum":  # Eq. 11 (a)
    log_p = log_softmax((gate[:, :, None] * head_scores).sum(axis=1))
  elif cfg.combine == "mixture_of_softmax":  # Eq. 11 (b)
    log_p = np.log((gate[:, :, None] * softmax(head_scores, axis=-1)).sum(axis=1))
  else:
    raise ValueError(cfg.combine)
  return {"log_p": log_p, "router": np.stack(routers), "gate": gate, "head_scores": head_scores}


def _to_numpy(tree):
  if isinstance(tree, dict) or hasattr(tree, "items"):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree, dtype=np.float64)


# ---------------------------------------------------------------------------
# Ranking and metrics.


def brute_force_rank(scores: np.ndarray, target: int, exclude, tol: float = 0.0) -> int:
  """Rank of `target` (1-based id) given `scores` [V] for ids 1..V.

  Counts the other candidates whose score is >= the target's (minus `tol`):
  ties count against the model. Ids in `exclude` are not candidates, except the
  target itself.
  """
  excluded = {int(e) for e in exclude if e > 0} - {int(target)}
  t = scores[target - 1]
  return sum(1 for v in range(1, len(scores) + 1)
             if v != target and v not in excluded and scores[v - 1] >= t - tol)


def brute_force_metrics(ranks) -> dict[str, float]:
  """HR@K, NDCG@K for K in 5, 10, 20 and MRR with one relevant item per user."""
  out = {}
  n = len(ranks)
  for k in (5, 10, 20):
    out[f"HR@{k}"] = sum(1 for r in ranks if r < k) / n
    out[f"NDCG@{k}"] = sum(1.0 / math.log2(r + 2) for r in ranks if r < k) / n
  out["MRR"] = sum(1.0 / (r + 1) for r in ranks) / n
  return out


def mixture_log_prob(vectors: np.ndarray, log_weights: np.ndarray, table: np.ndarray) -> np.ndarray:
  """log p(v) = log sum_k w_k softmax_v(<vectors_k, table_v>): [T, K, d], [T, K], [V, d] -> [T, V].

  A `[K, V, d]` table gives vector k its own table k.
  """
  logits = np.einsum("tkd,vd->tkv" if table.ndim == 2 else "tkd,kvd->tkv", vectors, table)
  return logsumexp(log_weights[:, :, None] + log_softmax(logits, axis=-1), axis=1)
