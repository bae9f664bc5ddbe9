"""FAME (and SASRec) written plainly in PyTorch: the reference that benchmarks/bench.py races.

This is what a user of a RecBole-style PyTorch implementation of the paper would
run, written idiomatically and without handicaps:

* right-padded `[B, L]` batches (the very batches fame-jax trains on);
* fused Q/K/V projections and `F.scaled_dot_product_attention` for every
  attention, including FAME's N query experts per head (grouped-query attention:
  the N experts of a head share its K/V);
* logits `[B*L, V]` against the whole catalogue and `F.cross_entropy` with the
  padding targets ignored: full-catalogue cross-entropy at every non-padding
  position, averaged over them (the fame-jax loss);
* FAME's per-head item projection (Eq. 9) applied on the user side by default,
  `<F^(h), E[v] W_f^(h)> = <W_f^(h) F^(h), E[v]>` (the algebraic identity fame-jax
  uses too, so both do the same FLOPs); `literal_item_projection=True` computes
  the per-head item tables `E W_f^(h)` and `[B, L, H, V]` head scores as written
  in the paper instead.

The module's numerics follow `fame_jax.model.SequenceRecommender` exactly
(post-LN blocks, exact GELU, LayerNorm eps, masked positions filled with the
float32 minimum before the softmax), so that `load_flax_params` + a deterministic
forward gives the same loss; tests/test_torch_reference.py checks it.

Only `torch` and `numpy` are needed here; fame-jax never imports this file.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}  # F.gelu is the exact (erf) GELU, as in fame-jax.


def padding_attention_mask(items: torch.Tensor, segments: torch.Tensor | None = None
                           ) -> torch.Tensor:
  """Additive float mask `[B, 1, L, L]`: 0 where a query may attend, float32-min elsewhere.

  Causal, and padding keys (item 0) are hidden. With `segments` (sequences packed
  into a row numbered 1, 2, ..., 0 = padding) a query attends within its own
  sequence only. A float mask (not a boolean one) keeps fully masked rows
  (padding) finite, as in fame-jax.
  """
  length = items.shape[1]
  causal = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
  if segments is None:
    allowed = causal[None, :, :] & (items > 0)[:, None, :]
  else:
    allowed = (causal[None, :, :] & (segments[:, :, None] == segments[:, None, :])
               & (segments > 0)[:, None, :])
  zero = torch.zeros((), dtype=torch.float32, device=items.device)
  neg = torch.full((), torch.finfo(torch.float32).min, dtype=torch.float32, device=items.device)
  return torch.where(allowed, zero, neg)[:, None, :, :]


class FeedForward(nn.Module):
  """Position-wise FFN, dropout, residual, post-LayerNorm (RecBole)."""

  def __init__(self, size: int, inner: int, activation: str, dropout: float, eps: float,
               residual: bool = True):
    super().__init__()
    self.inner = nn.Linear(size, inner)
    self.outer = nn.Linear(inner, size)
    self.norm = nn.LayerNorm(size, eps=eps)
    self.dropout = nn.Dropout(dropout)
    self.activation = ACTIVATIONS[activation]
    self.residual = residual

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = self.dropout(self.outer(self.activation(self.inner(x))))
    return self.norm(h + x if self.residual else h)


class TransformerBlock(nn.Module):
  """Post-LN causal multi-head self-attention block, then the FFN."""

  def __init__(self, cfg: Any):
    super().__init__()
    d = cfg.hidden_size
    self.num_heads = cfg.num_heads
    self.qkv = nn.Linear(d, 3 * d)  # Fused query/key/value projection.
    self.out = nn.Linear(d, d)
    self.attention_dropout = cfg.attention_dropout
    self.dropout = nn.Dropout(cfg.dropout)
    self.attention_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
    self.ffn = FeedForward(d, cfg.ffn_size, cfg.activation, cfg.dropout, cfg.layer_norm_eps)

  def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    b, length, d = x.shape
    q, k, v = self.qkv(x).view(b, length, 3, self.num_heads, d // self.num_heads).permute(
        2, 0, 3, 1, 4)  # 3 x [B, H, L, dh]
    h = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=self.attention_dropout if self.training else 0.0)
    h = self.out(h.transpose(1, 2).reshape(b, length, d))
    x = self.attention_norm(x + self.dropout(h))
    return self.ffn(x)


class FameLayer(nn.Module):
  """The last FAME layer: per head, shared K/V, N query experts, router (Eq. 14-17), FFN'.

  All heads at once: one fused projection gives every head's key, value and N
  queries; the H*N expert attentions are one grouped-query SDPA call.
  Returns F `[B, L, H, d']`.
  """

  def __init__(self, cfg: Any):
    super().__init__()
    d, self.h, self.n = cfg.hidden_size, cfg.num_heads, cfg.num_experts
    self.dh = d // self.h
    # Columns laid out [H, 2 + N, d']: per head its key, value, then the N expert queries.
    self.kvq = nn.Linear(d, self.h * (2 + self.n) * self.dh)
    self.router = nn.Parameter(torch.zeros(self.h, self.n * self.dh, self.n))  # Eq. 16 W_exp^(h)
    self.router_bias = nn.Parameter(torch.zeros(self.h, self.n))
    self.attention_dropout = cfg.attention_dropout
    self.head_ffn = FeedForward(self.dh, cfg.head_ffn_size, cfg.activation, cfg.dropout,
                                cfg.layer_norm_eps, residual=cfg.head_ffn_residual == "mixture")

  def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    b, length, _ = x.shape
    h, n, dh = self.h, self.n, self.dh
    proj = self.kvq(x).view(b, length, h, 2 + n, dh)
    key = proj[:, :, :, 0].transpose(1, 2)  # [B, H, L, d']
    value = proj[:, :, :, 1].transpose(1, 2)  # [B, H, L, d']
    query = proj[:, :, :, 2:].permute(0, 2, 3, 1, 4).reshape(b, h * n, length, dh)  # [B, H*N, L, d']
    experts = F.scaled_dot_product_attention(  # Eq. 14-15; query head h*N + i uses K/V head h.
        query, key, value, attn_mask=mask,
        dropout_p=self.attention_dropout if self.training else 0.0, enable_gqa=True)
    experts = experts.view(b, h, n, length, dh).permute(0, 3, 1, 2, 4)  # [B, L, H, N, d']
    router_logits = torch.einsum("blhe,hen->blhn", experts.reshape(b, length, h, n * dh),
                                 self.router) + self.router_bias
    router = torch.softmax(router_logits, dim=-1)  # [B, L, H, N]
    mixed = torch.einsum("blhn,blhnk->blhk", router, experts)  # Eq. 17
    return self.head_ffn(mixed)  # Eq. 7, shared by the heads (acts on the last axis).


class SequenceRecommender(nn.Module):
  """FAME (`cfg.name == "fame"`) or SASRec (`"sasrec"`), mirroring fame_jax.model.

  `cfg` is any object with the fields of `fame_jax.model.ModelConfig`.
  """

  def __init__(self, cfg: Any, literal_item_projection: bool = False):
    super().__init__()
    self.cfg = cfg
    d = cfg.hidden_size
    self.is_fame = cfg.name == "fame"
    self.literal_item_projection = literal_item_projection
    self.item_embedding = nn.Embedding(cfg.num_items + 1, d)
    self.position_embedding = nn.Embedding(cfg.max_len, d)
    self.input_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
    self.dropout = nn.Dropout(cfg.dropout)
    num_standard = cfg.num_layers - (1 if self.is_fame else 0)
    self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(num_standard))
    if self.is_fame:
      self.fame_layer = FameLayer(cfg)
      self.gate = nn.Linear(d, cfg.num_heads) if cfg.gate else None
      self.item_projection = nn.Parameter(torch.zeros(cfg.num_heads, d, d // cfg.num_heads))
    for p in self.parameters():  # RecBole's init; load_flax_params overwrites it anyway.
      if p.dim() > 1:
        nn.init.normal_(p, std=cfg.init_std)

  def encode(self, items: torch.Tensor, segments: torch.Tensor | None = None,
             positions: torch.Tensor | None = None) -> torch.Tensor:
    """Last hidden states: `[B, L, d]` (SASRec) or the FAME heads F `[B, L, H, d']`.

    `items` `[B, L]` are right-padded sequences, one per row; or, with `segments`
    and `positions` (fame-jax's packed batches), several sequences per row.
    """
    length = items.shape[1]
    pos = (self.position_embedding.weight[:length] if positions is None
           else self.position_embedding(positions))
    x = self.dropout(self.input_norm(self.item_embedding(items) + pos))
    mask = padding_attention_mask(items, segments)
    for block in self.blocks:
      x = block(x, mask)
    return self.fame_layer(x, mask) if self.is_fame else x

  def log_gate(self, heads: torch.Tensor) -> torch.Tensor:
    """Eq. 10: log g `[..., H]`."""
    if self.gate is None:
      return torch.full(heads.shape[:-1], -math.log(self.cfg.num_heads), device=heads.device)
    return torch.log_softmax(self.gate(heads.flatten(-2)), dim=-1)

  def catalogue_logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scores of every item 1..V for each row of `hidden` (`[T, d]` or FAME heads `[T, H, d']`).

    Returns `(logits, log_gate)`: logits `[T, V]` with log_gate None (SASRec, FAME
    "logit_sum"), or per-head logits `[T, H, V]` and log_gate `[T, H]` (FAME
    "mixture_of_softmax").
    """
    table = self.item_embedding.weight[1:]  # [V, d]
    if not self.is_fame:
      return hidden @ table.T, None
    log_g = self.log_gate(hidden)
    if self.literal_item_projection:  # Eq. 9 as written: per-head item tables E W_f^(h).
      head_tables = torch.einsum("vd,hdk->hvk", table, self.item_projection)  # [H, V, d']
      head_logits = torch.einsum("thk,hvk->thv", hidden, head_tables)  # Eq. 8: [T, H, V]
    else:  # Same scores, user side projected: u_h = W_f^(h) F^(h).
      user = torch.einsum("thk,hdk->thd", hidden, self.item_projection)  # [T, H, d]
      if self.cfg.combine == "logit_sum":
        return torch.einsum("th,thd->td", log_g.exp(), user) @ table.T, None
      head_logits = user @ table.T  # [T, H, V]
    if self.cfg.combine == "logit_sum":
      return torch.einsum("th,thv->tv", log_g.exp(), head_logits), None
    return head_logits, log_g

  def loss(self, items: torch.Tensor, targets: torch.Tensor, segments: torch.Tensor | None = None,
           positions: torch.Tensor | None = None) -> torch.Tensor:
    """Mean full-catalogue cross-entropy over non-padding positions (targets > 0)."""
    hidden = self.encode(items, segments, positions)
    flat = hidden.flatten(0, 1)  # [B*L, d] or [B*L, H, d']
    logits, log_g = self.catalogue_logits(flat)  # [B*L, V] (or [B*L, H, V])
    labels = targets.reshape(-1) - 1  # Item v is column v - 1; padding becomes -1.
    if log_g is None:
      return F.cross_entropy(logits, labels, ignore_index=-1)
    # Mixture of softmaxes: -log sum_h g_h softmax_h(target).
    log_probs = torch.log_softmax(logits, dim=-1)  # [T, H, V]
    picked = log_probs.gather(-1, labels.clamp(min=0)[:, None, None].expand(-1, log_probs.shape[1], 1))
    nll = -torch.logsumexp(log_g + picked[..., 0], dim=-1)
    valid = labels >= 0
    return (nll * valid).sum() / valid.sum().clamp(min=1)

  def ranks(self, items: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
            exclude: torch.Tensor) -> torch.Tensor:
    """Full-ranking 0-based ranks of the targets (fame_jax.scoring.target_ranks semantics).

    The rank is the number of other candidates scoring >= the target; items in
    `exclude` (the history, 0-padded) are dropped unless they are the target.
    """
    hidden = self.encode(items)
    rows = torch.arange(items.shape[0], device=items.device)
    last = hidden[rows, lengths - 1]  # [B, d] or [B, H, d']
    logits, log_g = self.catalogue_logits(last)
    if log_g is None:
      scores = logits  # [B, V]
    else:  # log p(v) of the mixture of softmaxes.
      scores = torch.logsumexp(log_g[..., None] + torch.log_softmax(logits, dim=-1), dim=1)
    target_score = scores.gather(1, (targets - 1)[:, None])
    dropped = torch.zeros(items.shape[0], scores.shape[1] + 1, dtype=torch.bool,
                          device=items.device)
    dropped.scatter_(1, exclude.long(), True)
    dropped[:, 0] = False  # Column 0 collects the padding ids.
    dropped[rows, targets] = False  # The target is always a candidate...
    better = (scores >= target_score) & ~dropped[:, 1:]
    return better.sum(dim=1) - 1  # ...but not counted against itself.


# ---------------------------------------------------------------------------
# Flax parameter tree -> PyTorch state dict.


def _t(x) -> torch.Tensor:
  return torch.from_numpy(np.array(x, dtype=np.float32, copy=True))


def _dense_general_in(kernel, bias) -> tuple[torch.Tensor, torch.Tensor]:
  """flax DenseGeneral `[d, *out]` kernel, `[*out]` bias -> nn.Linear weight `[prod(out), d]`, bias."""
  k = np.asarray(kernel, np.float32)
  return _t(k.reshape(k.shape[0], -1).T), _t(np.asarray(bias, np.float32).reshape(-1))


def _ffn(prefix: str, p: Mapping[str, Any]) -> dict[str, torch.Tensor]:
  return {
      f"{prefix}.inner.weight": _t(np.asarray(p["inner"]["kernel"]).T),
      f"{prefix}.inner.bias": _t(p["inner"]["bias"]),
      f"{prefix}.outer.weight": _t(np.asarray(p["outer"]["kernel"]).T),
      f"{prefix}.outer.bias": _t(p["outer"]["bias"]),
      f"{prefix}.norm.weight": _t(p["norm"]["scale"]),
      f"{prefix}.norm.bias": _t(p["norm"]["bias"]),
  }


def state_dict_from_flax(params: Mapping[str, Any], cfg: Any) -> dict[str, torch.Tensor]:
  """Maps a fame-jax parameter tree onto `SequenceRecommender(cfg).state_dict()` keys."""
  # fame-jax may pad its table with unused rows (to split it evenly over devices): keep 0..V.
  sd = {
      "item_embedding.weight": _t(np.asarray(params["item_embedding"]["embedding"])[:cfg.num_items + 1]),
      "position_embedding.weight": _t(params["position_embedding"]["embedding"]),
      "input_norm.weight": _t(params["input_norm"]["scale"]),
      "input_norm.bias": _t(params["input_norm"]["bias"]),
  }
  num_standard = cfg.num_layers - (1 if cfg.name == "fame" else 0)
  for i in range(num_standard):
    p = params[f"block_{i}"]
    att = p["attention"]
    # Flax MultiHeadDotProductAttention: query/key/value kernels [d, H, dh], out [H, dh, d].
    qkv = [_dense_general_in(att[n]["kernel"], att[n]["bias"]) for n in ("query", "key", "value")]
    sd[f"blocks.{i}.qkv.weight"] = torch.cat([w for w, _ in qkv], dim=0)
    sd[f"blocks.{i}.qkv.bias"] = torch.cat([b for _, b in qkv], dim=0)
    out = np.asarray(att["out"]["kernel"], np.float32)
    sd[f"blocks.{i}.out.weight"] = _t(out.reshape(-1, out.shape[-1]).T)
    sd[f"blocks.{i}.out.bias"] = _t(att["out"]["bias"])
    sd[f"blocks.{i}.attention_norm.weight"] = _t(p["attention_norm"]["scale"])
    sd[f"blocks.{i}.attention_norm.bias"] = _t(p["attention_norm"]["bias"])
    sd.update(_ffn(f"blocks.{i}.ffn", p["ffn"]))
  if cfg.name == "fame":
    heads = params["fame_layer"]["heads"]  # nn.vmap'ed over heads: leading axis H.
    key_k = np.asarray(heads["key"]["kernel"], np.float32)  # [H, d, d']
    value_k = np.asarray(heads["value"]["kernel"], np.float32)  # [H, d, d']
    query_k = np.asarray(heads["query"]["kernel"], np.float32)  # [H, d, N, d']
    kernel = np.concatenate([key_k[:, :, None], value_k[:, :, None], query_k], axis=2)
    kernel = kernel.transpose(1, 0, 2, 3)  # [d, H, 2 + N, d']
    bias = np.concatenate([np.asarray(heads["key"]["bias"])[:, None],
                           np.asarray(heads["value"]["bias"])[:, None],
                           np.asarray(heads["query"]["bias"])], axis=1)  # [H, 2 + N, d']
    sd["fame_layer.kvq.weight"] = _t(kernel.reshape(kernel.shape[0], -1).T)
    sd["fame_layer.kvq.bias"] = _t(bias.reshape(-1))
    sd["fame_layer.router"] = _t(heads["router"]["kernel"])  # [H, N d', N]
    sd["fame_layer.router_bias"] = _t(heads["router"]["bias"])  # [H, N]
    sd.update(_ffn("fame_layer.head_ffn", params["fame_layer"]["head_ffn"]))
    if cfg.gate:
      sd["gate.weight"] = _t(np.asarray(params["gate"]["kernel"]).T)
      sd["gate.bias"] = _t(params["gate"]["bias"])
    sd["item_projection"] = _t(params["item_projection"])  # [H, d, d']
  return sd


def load_flax_params(module: SequenceRecommender, params: Mapping[str, Any]) -> None:
  """Copies a fame-jax parameter tree into `module` (strict: every tensor, right shapes)."""
  sd = state_dict_from_flax(params, module.cfg)
  own = module.state_dict()
  for name, value in sd.items():
    if name not in own:
      raise KeyError(f"{name}: not a parameter of the torch module")
    if tuple(own[name].shape) != tuple(value.shape):
      raise ValueError(f"{name}: flax gives {tuple(value.shape)}, torch has {tuple(own[name].shape)}")
  module.load_state_dict(sd, strict=True)
