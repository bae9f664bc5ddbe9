"""FAME and SASRec as pure Flax linen modules.

Both models map a right-padded batch of item ids `[B, L]` to *user vectors*,
one or more per position, that score the catalogue (`item_tables`):

  vectors     [B, L, K, D]  K = 1, D = d for SASRec and FAME with the "logit_sum" rule,
                            K = H, D = d' for FAME with the "mixture_of_softmax" rule;
  log_weights [B, L, K]     log of the mixture weights over the K vectors.

The next-item distribution at a position is then

  log p(v) = logsumexp_k( log_weights_k + <vectors_k, e_k[v]> - lse_k ),
  lse_k    = logsumexp_{v'} <vectors_k, e_k[v']>,

which `fame_jax.scoring` evaluates against the whole catalogue in chunks, with
e = E (the item table) for SASRec and "logit_sum", and e_h = E W_f^(h)
(per-head item embeddings, Eq. 9) for the mixture. This covers both rules of
Eq. 11:

* logit_sum: score(v) = sum_h g_h <F^(h), E[v] W_f^(h)> = <sum_h g_h W_f^(h) F^(h), E[v]>,
  a single d-dimensional vector per position (K = 1), scored against E;
* mixture_of_softmax: F^(h) itself per head (K = H, D = d'), scored against
  E W_f^(h) as the paper writes it: d' multiply-adds per item and head, d per
  item in all, where projecting the user side (W_f^(h) F^(h) against E) would
  cost H d.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

Array = jax.Array

MODEL_NAMES = ("fame", "sasrec")
COMBINE_RULES = ("logit_sum", "mixture_of_softmax")
HEAD_FFN_RESIDUALS = ("mixture", "none")


@jax.checkpoint
def _gelu(x: Array) -> Array:
  """Exact (erf) GELU that keeps only its input for the backward pass.

  Without the checkpoint, XLA keeps the erf and exp terms of every FFN's
  activation from the forward pass to the backward pass; recomputing them
  there costs no measurable time and takes ~4 MB per FFN off a training
  step's temporaries (benchmarks/README.md, "Host memory").
  """
  return nn.gelu(x, approximate=False)


ACTIVATIONS = {"gelu": _gelu, "relu": nn.relu}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TABLE_ROW_MULTIPLE = 128


class UserVectors(NamedTuple):
  """Per-position representation that scores the catalogue (see module doc)."""
  vectors: Array  # [B, L, K, d]
  log_weights: Array  # [B, L, K]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Validated, hashable model hyper-parameters (built from `config.model`)."""
  name: str
  num_items: int
  max_len: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_experts: int
  ffn_size: int
  head_ffn_size: int
  dropout: float
  attention_dropout: float
  activation: str
  layer_norm_eps: float
  init_std: float
  combine: str
  gate: bool
  head_ffn_residual: str
  dtype: str

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def table_rows(self) -> int:
    """Rows of the item-embedding table: padding id 0, items 1..V, then unused rows up to a
    multiple of 128, so that the table can be split evenly over up to 128 devices."""
    return -(-(self.num_items + 1) // TABLE_ROW_MULTIPLE) * TABLE_ROW_MULTIPLE

  @property
  def per_head_tables(self) -> bool:
    """Whether each head scores against its own item table E W_f^(h) (the mixture rule)."""
    return self.name == "fame" and self.combine == "mixture_of_softmax"

  @property
  def num_vectors(self) -> int:
    """K: user vectors per position."""
    return self.num_heads if self.per_head_tables else 1

  @property
  def vector_size(self) -> int:
    """D: size of a user vector (d' against per-head tables, else d)."""
    return self.head_dim if self.per_head_tables else self.hidden_size


class ConfigError(ValueError):
  """An impossible configuration; the message names the field."""


def model_config_from(config: ml_collections.ConfigDict, num_items: int) -> ModelConfig:
  """Builds and validates a `ModelConfig`; raises `ConfigError` naming the bad field."""
  m = config.model

  def check(ok: bool, field: str, why: str) -> None:
    if not ok:
      raise ConfigError(f"config.{field}: {why}")

  check(m.name in MODEL_NAMES, "model.name", f"got {m.name!r}, expected one of {MODEL_NAMES}")
  check(m.hidden_size >= 1, "model.hidden_size", f"must be >= 1, got {m.hidden_size}")
  check(m.num_layers >= 1, "model.num_layers", f"must be >= 1, got {m.num_layers}")
  check(m.num_heads >= 1, "model.num_heads", f"must be >= 1, got {m.num_heads}")
  check(m.hidden_size % m.num_heads == 0, "model.num_heads",
        f"num_heads={m.num_heads} must divide hidden_size={m.hidden_size}")
  check(m.num_experts >= 1, "model.num_experts", f"must be >= 1, got {m.num_experts}")
  check(m.ffn_size >= 1, "model.ffn_size", f"must be >= 1, got {m.ffn_size}")
  check(m.head_ffn_size >= 0, "model.head_ffn_size", f"must be >= 0, got {m.head_ffn_size}")
  check(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
  check(0.0 <= m.attention_dropout < 1.0, "model.attention_dropout",
        f"must be in [0, 1), got {m.attention_dropout}")
  check(m.activation in ACTIVATIONS, "model.activation",
        f"got {m.activation!r}, expected one of {tuple(ACTIVATIONS)}")
  check(m.combine in COMBINE_RULES, "model.combine",
        f"got {m.combine!r}, expected one of {COMBINE_RULES}")
  check(m.head_ffn_residual in HEAD_FFN_RESIDUALS, "model.head_ffn_residual",
        f"got {m.head_ffn_residual!r}, expected one of {HEAD_FFN_RESIDUALS}")
  check(m.dtype in DTYPES, "model.dtype", f"got {m.dtype!r}, expected one of {tuple(DTYPES)}")
  check(m.init_std > 0, "model.init_std", f"must be > 0, got {m.init_std}")
  check(config.data.max_len >= 1, "data.max_len", f"must be >= 1, got {config.data.max_len}")
  check(num_items >= 2, "data", f"the dataset has {num_items} items; need at least 2")
  head_dim = m.hidden_size // m.num_heads
  return ModelConfig(
      name=m.name, num_items=num_items, max_len=config.data.max_len,
      hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
      num_experts=m.num_experts, ffn_size=m.ffn_size,
      head_ffn_size=m.head_ffn_size or 4 * head_dim, dropout=m.dropout,
      attention_dropout=m.attention_dropout, activation=m.activation,
      layer_norm_eps=m.layer_norm_eps, init_std=m.init_std, combine=m.combine,
      gate=bool(m.gate), head_ffn_residual=m.head_ffn_residual, dtype=m.dtype)


def attention_mask(segments: Array) -> Array:
  """`[B, 1, L, L]`, True = may attend: causal, within the same segment, never to padding.

  `segments` `[B, L]` numbers the sequences packed into a row (1, 2, ...), 0 is padding.
  """
  length = segments.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))
  same = segments[:, :, None] == segments[:, None, :]
  return (causal[None] & same & (segments[:, None, :] > 0))[:, None, :, :]


class FeedForward(nn.Module):
  """Position-wise FFN with dropout, residual and post-LayerNorm (RecBole style)."""
  inner_size: int
  activation: str
  dropout: float
  layer_norm_eps: float
  init_std: float
  dtype: Any
  residual: bool = True

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    init = nn.initializers.normal(self.init_std)
    h = nn.Dense(self.inner_size, kernel_init=init, dtype=self.dtype, name="inner")(x)
    h = ACTIVATIONS[self.activation](h)
    h = nn.Dense(x.shape[-1], kernel_init=init, dtype=self.dtype, name="outer")(h)
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    if self.residual:
      h = h + x
    return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="norm")(h)


def _weights_times_values(spec: str, weights: Array, values: Array) -> Array:
  """Flax's attention product `...hqk,...khd->...qhd`, with the values moved heads-first.

  The same numbers, as one plain batched matmul per head. Left to itself,
  XLA:CPU computes this product as values times weights into a `[B, H, d', L]`
  buffer and transposes it back: the forward pass of a Beauty evaluation took
  ~10% longer (benchmarks/README.md, "The Xeon, eighth look"). Passed to Flax's
  `MultiHeadDotProductAttention` as its `attn_weights_value_einsum_cls`.
  """
  if spec != "...hqk,...khd->...qhd":
    raise ValueError(f"unexpected attention einsum {spec!r}")
  out = jnp.einsum("...hqk,...hkd->...hqd", weights, jnp.swapaxes(values, -3, -2))
  return jnp.swapaxes(out, -3, -2)


class TransformerBlock(nn.Module):
  """Post-LN block: causal multi-head self-attention, then the FFN."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool,
               context: Array | None = None) -> Array:
    """`x` `[B, Lq, d]` attends to `context` `[B, L, d]` (default: `x` itself) under `mask`."""
    cfg = self.cfg
    dtype = DTYPES[cfg.dtype]
    init = nn.initializers.normal(cfg.init_std)
    h = nn.MultiHeadDotProductAttention(
        num_heads=cfg.num_heads, qkv_features=cfg.hidden_size,
        out_features=cfg.hidden_size, dropout_rate=cfg.attention_dropout, broadcast_dropout=False,
        kernel_init=init, dtype=dtype, qk_attn_weights_einsum_cls=lambda: jnp.einsum,
        attn_weights_value_einsum_cls=lambda: _weights_times_values, name="attention")(
            x, context, mask=mask, deterministic=deterministic)
    h = nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype, name="attention_norm")(x + h)
    return FeedForward(cfg.ffn_size, cfg.activation, cfg.dropout, cfg.layer_norm_eps,
                       cfg.init_std, dtype, name="ffn")(x, deterministic)


class ExpertAttentionHead(nn.Module):
  """One FAME head (Eq. 14-17): N query experts over a shared K/V, then a router.

  Written for a single head; `FameLayer` maps it over heads with `nn.vmap`.
  Queries come from `x` `[B, Lq, d]`, keys and values from `context` `[B, L, d]`
  (the same tensor in training). With `context_rows` `[B]`, `context` holds
  other rows `[R, L, d]` and query row b attends to row `context_rows[b]`:
  keys and values are projected once per row, then gathered. Returns the
  expert mixture f^(h): `[B, Lq, d']`.
  """
  cfg: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x: Array, context: Array, mask: Array,
               context_rows: Array | None = None) -> Array:
    cfg = self.cfg
    dtype = DTYPES[cfg.dtype]
    init = nn.initializers.normal(cfg.init_std)
    d_head, n_exp = cfg.head_dim, cfg.num_experts
    key = nn.Dense(d_head, kernel_init=init, dtype=dtype, name="key")(context)  # [B, L, d']
    value = nn.Dense(d_head, kernel_init=init, dtype=dtype, name="value")(context)  # [B, L, d']
    if context_rows is not None:
      key, value = key[context_rows], value[context_rows]
    query = nn.DenseGeneral((n_exp, d_head), kernel_init=init, dtype=dtype,
                            name="query")(x)  # [B, Lq, N, d']
    # Scores laid out [B, Lq, N, L]: (query, expert) pairs are contiguous rows of
    # one batched matmul per sequence, so no operand needs a transposed copy.
    logits = jnp.einsum("blnk,bmk->blnm", query, key) / math.sqrt(d_head)
    mask = jnp.swapaxes(mask, 1, 2)  # [B, 1, Lq, L] -> [B, Lq, 1, L]
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)
    probs = nn.Dropout(cfg.attention_dropout)(probs, deterministic=self.deterministic)
    experts = jnp.einsum("blnm,bmk->blnk", probs, value)  # f^(h,n): [B, Lq, N, d']
    b, length = x.shape[:2]
    router_logits = nn.Dense(n_exp, kernel_init=init, dtype=dtype, name="router")(
        experts.reshape(b, length, n_exp * d_head))  # Eq. 16
    router = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # [B, L, N]
    self.sow("intermediates", "router_weights", router)
    return jnp.einsum("bln,blnk->blk", router.astype(dtype), experts)  # Eq. 17


class FameLayer(nn.Module):
  """The last layer of FAME: per-head expert attention, shared FFN', no W_O.

  Returns F: `[B, L, H, d']`, one sub-embedding per head.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array, context: Array, mask: Array, deterministic: bool,
               context_rows: Array | None = None) -> Array:
    cfg = self.cfg
    heads = nn.vmap(
        ExpertAttentionHead,
        in_axes=(None, None, None, None), out_axes=2, axis_size=cfg.num_heads,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
    )(cfg, deterministic, name="heads")
    mixed = heads(x, context, mask, context_rows)  # [B, Lq, H, d']
    # Eq. 7: FFN' on d' dimensions, shared by all heads (it acts on the last axis).
    return FeedForward(cfg.head_ffn_size, cfg.activation, cfg.dropout, cfg.layer_norm_eps,
                       cfg.init_std, DTYPES[cfg.dtype],
                       residual=cfg.head_ffn_residual == "mixture",
                       name="head_ffn")(mixed, deterministic)


class SequenceRecommender(nn.Module):
  """SASRec (cfg.name == "sasrec") or FAME (cfg.name == "fame")."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, items: Array, *, segments: Array | None = None,
               positions: Array | None = None, deterministic: bool = True,
               output_at: tuple[Array, Array] | None = None) -> UserVectors:
    """User vectors at every position of `items` `[B, L]` (0 = padding).

    By default each row is one right-padded sequence. Several sequences may be
    packed into a row by giving `segments` (1, 2, ... per sequence, 0 for
    padding) and `positions` (0-based position of each item in its sequence).

    `output_at = (rows, columns)`, both `[U]`, asks for the user vectors at
    those U slots only (evaluation: each history's last item), returned as
    `[U, 1, K, d]`. The last layer then runs its queries, FFN and heads at
    those slots alone; its keys and values still see the whole row (FAME
    projects them once per row and gathers them for each slot).
    """
    cfg = self.cfg
    chex.assert_rank(items, 2)
    batch, length = items.shape
    if segments is None:
      segments = (items > 0).astype(jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    chex.assert_equal_shape([items, segments, positions])
    if length > cfg.max_len:
      raise ValueError(f"sequence length {length} exceeds data.max_len={cfg.max_len}")
    dtype = DTYPES[cfg.dtype]
    init = nn.initializers.normal(cfg.init_std)
    item_embedding = nn.Embed(cfg.table_rows, cfg.hidden_size, embedding_init=init,
                              name="item_embedding")
    position_embedding = nn.Embed(cfg.max_len, cfg.hidden_size, embedding_init=init,
                                  name="position_embedding")
    x = item_embedding(items) + position_embedding(positions)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype, name="input_norm")(x)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    mask = attention_mask(segments)
    num_standard = cfg.num_layers - (1 if cfg.name == "fame" else 0)
    last_layer = "fame_layer" if cfg.name == "fame" else f"block_{num_standard - 1}"
    for i in range(num_standard - (cfg.name == "sasrec" and output_at is not None)):
      x = TransformerBlock(cfg, name=f"block_{i}")(x, mask, deterministic)
    context, context_rows = x, None
    if output_at is not None:  # The last layer queries from the requested slots only.
      rows, columns = output_at
      chex.assert_shape([rows, columns], (None,))
      x = x[rows, columns][:, None]  # [U, 1, d]
      row_segments = segments[rows]
      mask = ((row_segments == segments[rows, columns][:, None]) & (row_segments > 0)
              & (jnp.arange(length)[None, :] <= columns[:, None]))[:, None, None, :]
      batch, length = rows.shape[0], 1
      if cfg.name == "sasrec":
        x = TransformerBlock(cfg, name=last_layer)(x, mask, deterministic, context[rows])
      else:  # FAME's heads project keys and values once per row, then gather them.
        context_rows = rows
    if cfg.name == "sasrec":
      vectors = x[:, :, None, :]
      log_weights = jnp.zeros((batch, length, 1), jnp.float32)
    else:
      vectors, log_weights = self._facet_heads(x, context, mask, deterministic, context_rows)
    chex.assert_shape(vectors, (batch, length, cfg.num_vectors, cfg.vector_size))
    chex.assert_shape(log_weights, (batch, length, cfg.num_vectors))
    return UserVectors(vectors, log_weights)

  def _facet_heads(self, x: Array, context: Array, mask: Array, deterministic: bool,
                   context_rows: Array | None = None) -> tuple[Array, Array]:
    """FAME layer, gate (Eq. 10) and head combination (Eq. 11)."""
    cfg = self.cfg
    dtype = DTYPES[cfg.dtype]
    init = nn.initializers.normal(cfg.init_std)
    batch, length = x.shape[:2]
    heads = FameLayer(cfg, name="fame_layer")(x, context, mask, deterministic,
                                              context_rows)  # [B, L, H, d']
    if cfg.gate:
      gate_logits = nn.Dense(cfg.num_heads, kernel_init=init, dtype=dtype, name="gate")(
          heads.reshape(batch, length, cfg.hidden_size))
      log_gate = jax.nn.log_softmax(gate_logits.astype(jnp.float32), axis=-1)
    else:
      log_gate = jnp.full((batch, length, cfg.num_heads), -math.log(cfg.num_heads), jnp.float32)
    self.sow("intermediates", "gate_weights", jnp.exp(log_gate))
    # W_f^(h) of Eq. 9; `item_tables` applies it to the item table for the mixture rule.
    item_projection = self.param("item_projection", init,
                                 (cfg.num_heads, cfg.hidden_size, cfg.head_dim))
    if cfg.combine == "logit_sum":  # sum_h g_h <F^(h), E[v] W_f^(h)> = <sum_h g_h W_f^(h) F^(h), E[v]>.
      per_head = jnp.einsum("blhk,hdk->blhd", heads, item_projection.astype(dtype))
      vectors = jnp.einsum("blh,blhd->bld", jnp.exp(log_gate).astype(dtype), per_head)
      return vectors[:, :, None, :], jnp.zeros((batch, length, 1), jnp.float32)
    return heads, log_gate


def build_model(cfg: ModelConfig) -> SequenceRecommender:
  return SequenceRecommender(cfg)


def item_tables(params: Any, cfg: ModelConfig) -> Array:
  """What the user vectors score against: `[V, d]`, or `[H, V, d']` per-head tables.

  The per-head item embeddings e_v^(h) = E[v] W_f^(h) (Eq. 9) of FAME's mixture
  rule; the item table E itself otherwise. Row i is item i + 1 (the table's row 0
  is padding, and rows past V pad it to a multiple of 128).
  """
  with jax.named_scope("item_tables"):
    table = params["item_embedding"]["embedding"]
    if not cfg.per_head_tables:
      return table[1:cfg.num_items + 1]
    # Projected whole, then sliced: the gradient of W_f then reads the parameter
    # itself, where a slice taken first would be a copy of E kept for the backward
    # pass (5 MB of a Yelp step's temporaries).
    return jnp.einsum("vd,hdk->hvk", table, params["item_projection"])[:, 1:cfg.num_items + 1]
