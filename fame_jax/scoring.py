"""Scoring the whole catalogue: next-item cross-entropy and full-ranking ranks.

Everything here works on flat token buffers of user vectors (`[T, K, D]`, see
`fame_jax.model.UserVectors`) against the catalogue: either one item table
`[V, D]` that all K vectors score against, or one table per vector `[K, V, D]`
(FAME's per-head item embeddings E W_f^(h) of Eq. 9). With
`chunk_size > 0` the catalogue is streamed in chunks of items (a running
log-sum-exp for the loss, running counts for the ranks), so memory is
`O(T * chunk_size)` instead of `O(T * V)`; the loss's backward pass recomputes
each chunk (`_streaming_lse`). The training loss can instead score blocks of
`row_block` positions against the whole catalogue and take its gradients in the
same pass (`next_item_nll`, memory `O(row_block * V)`; the CPU default). Ranking
works on blocks of users so that their scores stay in cache. Scores never leave
the device: ranking returns only ranks.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


Array = jax.Array

# What `-1` (auto) resolves to; see `auto_chunk_size` and `auto_user_block`.
CPU_CHUNK_SIZE = 1024
CPU_USER_BLOCK = 128
CPU_EVAL_BATCH_SIZE = 512
AUTO_LOGITS_BYTES = 1 << 30


def _logits(vectors: Array, table: Array, dtype) -> Array:
  """`[T, K, D] x [C, D] (or [K, C, D]) -> [T, K, C]` in `dtype`, float32 accumulation."""
  spec = "tkd,cd->tkc" if table.ndim == 2 else "tkd,kcd->tkc"
  return jnp.einsum(spec, vectors.astype(dtype), table.astype(dtype),
                    preferred_element_type=jnp.float32)


class _Chunks(NamedTuple):
  """The catalogue cut into `n` chunks of `shards x per` rows, scanned in order.

  `rows` is `[n, G, shards * per, D]`: G = 1 for a shared table, K for one table
  per user vector.

  Shard `s` of the item table (rows split evenly, as a row-sharded table is
  laid out over devices) contributes `per` of its rows to every chunk, so with
  `shards` = devices on the 'model' axis each device scores only its own rows.
  """
  rows: Array  # [n, G, shards * per, D]
  ids: Array  # [n, shards * per] item ids 1..V, 0 for padding rows
  num: int
  per: int
  shards: int

  def locate(self, item_ids: Array) -> tuple[Array, Array]:
    """(chunk index, column within the chunk) of item ids 1..V."""
    zero_based = item_ids - 1
    shard, rest = zero_based // (self.num * self.per), zero_based % (self.num * self.per)
    return rest // self.per, shard * self.per + rest % self.per


def _chunked_table(table: Array, chunk_size: int, mesh: Mesh | None = None) -> _Chunks:
  """Pads `[V, D]` or `[G, V, D]` and cuts it into `_Chunks` (sharded over 'model' if `mesh`
  has that axis)."""
  groups = table if table.ndim == 3 else table[None]  # [G, V, D]
  num_groups, num_items, dim = groups.shape
  shards = mesh.shape.get("model", 1) if mesh is not None else 1
  per = max(1, chunk_size // shards)
  num = -(-num_items // (shards * per))
  groups = jnp.pad(groups, ((0, 0), (0, num * shards * per - num_items), (0, 0)))
  rows = groups.reshape(num_groups, shards, num, per, dim).transpose(2, 0, 1, 3, 4)
  ids = jnp.arange(1, num * shards * per + 1).reshape(shards, num, per).transpose(1, 0, 2)
  if shards > 1:  # rows: [n, G, S, per, D]
    rows = jax.lax.with_sharding_constraint(rows, NamedSharding(mesh, P(None, None, "model")))
  ids = jnp.where(ids <= num_items, ids, 0)
  return _Chunks(rows.reshape(num, num_groups, shards * per, dim),
                 ids.reshape(num, shards * per), num, per, shards)


def log_normalizers(vectors: Array, table: Array, chunk_size: int = 0,
                    dtype=jnp.float32, mesh: Mesh | None = None) -> Array:
  """lse_k = logsumexp_v <vectors_k, table_v> over all items: `[T, K]`.

  `table` is `[V, D]`, or `[K, V, D]` with table k scoring vector k.
  With `chunk_size > 0` this is a streaming log-sum-exp over item chunks with a
  hand-written backward pass (`_streaming_lse`): no `[T, K, V]` buffer exists
  in either pass, so the chunk's logits stay in cache.
  """
  if chunk_size <= 0 or chunk_size >= table.shape[-2]:
    return jax.nn.logsumexp(_logits(vectors, table, dtype), axis=-1)
  num, k, dim = vectors.shape
  if table.ndim == 2:  # One table: all T * K vectors form one group.
    return _streaming_lse(vectors.reshape(1, num * k, dim), table, chunk_size, dtype,
                          mesh).reshape(num, k)
  return _streaming_lse(vectors.transpose(1, 0, 2), table, chunk_size, dtype, mesh).T


# The forward pass's stabiliser sits at most this many nats above the best logit
# among the first `_PROBE_ITEMS` items (see `_streaming_lse`).
_STABILISER_HEADROOM = 40.0
_PROBE_ITEMS = 128
# log of float32's largest finite value is 88.7.
_EXP_RANGE = 87.0
# Vectors per batch of the exact fallback pass (its `[block, G, chunk]` buffers stay small).
_FALLBACK_BLOCK = 128


def _streaming_lse(u: Array, table: Array, chunk_size: int, dtype, mesh: Mesh | None) -> Array:
  """`[G, N, D] x [V, D] (or [G, V, D]) -> [G, N]` log-sum-exp over items, with a custom VJP.

  Group g of vectors scores against table g (or all against the one table).

  Forward: one pass over the chunks summing `exp(logits - c)` with a per-row
  stabiliser `c` fixed before the pass, so that each chunk's logits go through
  one fused exp and a sum (no running max, no rescaling). Under
  differentiation the same pass also sums `exp(logits - c) @ rows`: divided by
  the sum, that is the softmax-weighted item vector, the gradient with respect
  to `u` (up to the cotangent), so the backward pass does not compute it again.
  `c = min(|u| max_v |e_v|, L + 40)`, where L is the best logit among the first
  128 items: no logit exceeds the first term (Cauchy-Schwarz) and the best
  logit is at least L, so the largest term is at least e^-40 and the terms
  below float32's normal range (e^-87) weigh less than e^-47 of the sum. Only
  where some logit lies more than ~120 nats above L can the sum overflow; then
  (or on non-finite input) the batch is redone exactly, with a running max
  (`exact`, a `lax.cond` that costs nothing on CPU when not taken; on a GPU
  it reads its predicate back to the host, once a step, but there chunks are
  used only for catalogues whose logits pass 1 GiB: `auto_chunk_size`).

  Backward: one more pass that recomputes each chunk's logits and turns them
  into `p = softmax * g` at once, then `d rows = u^T @ p` (written `[D, C]` so
  that the big operand is read in its natural layout). On 2 CPU cores this
  forward pass and the `prefer_vector_width` compile option
  (`runtime.compiler_options`) take a Beauty FAME step from ~60 to ~51 ms
  (benchmarks/README.md).
  """
  chunks = _chunked_table(table, chunk_size, mesh)
  floor = jnp.finfo(jnp.float32).min

  def chunk_logits(u, rows, row_ids):
    logits = jnp.einsum("gnd,gcd->gnc", u.astype(dtype), rows.astype(dtype),
                        preferred_element_type=jnp.float32)
    return jnp.where(row_ids > 0, logits, -jnp.inf)

  def weighted_rows(e, rows):
    return jnp.einsum("gnc,gcd->gnd", e.astype(dtype), rows.astype(dtype),
                      preferred_element_type=jnp.float32)

  def stabiliser(u, rows, ids):
    """`c` `[G, N]`: at most 40 above the best logit, never above the Cauchy-Schwarz bound."""
    row_norm = jnp.sqrt(jnp.max(jnp.sum(jnp.square(rows.astype(jnp.float32)), axis=-1),
                                axis=(0, 2)))  # [G]
    bound = jnp.linalg.norm(u.astype(jnp.float32), axis=-1) * row_norm[:, None]
    probe = chunk_logits(u, rows[0, :, :_PROBE_ITEMS], ids[0, :_PROBE_ITEMS]).max(axis=-1)
    return jnp.minimum(bound, probe + _STABILISER_HEADROOM)

  def exact(u, rows, ids, with_grad):
    """Running-max log-sum-exp (and weighted rows), `_FALLBACK_BLOCK` vectors at a time."""
    def one_vector(v):  # v: [G, D]
      def step(carry, chunk):
        running_max, running_sum, acc = carry
        logits = chunk_logits(v[:, None], *chunk)[:, 0]  # [G, C]
        new_max = jnp.maximum(running_max, logits.max(axis=-1))
        scale = jnp.exp(running_max - new_max)
        e = jnp.exp(logits - new_max[:, None])
        acc = acc * scale[:, None] + weighted_rows(e[:, None], chunk[0])[:, 0]
        return (new_max, running_sum * scale + e.sum(axis=-1), acc), None
      init = (jnp.full(v.shape[:1], floor, jnp.float32), jnp.zeros(v.shape[:1], jnp.float32),
              jnp.zeros(v.shape, jnp.float32))
      (running_max, total, acc), _ = jax.lax.scan(step, init, (rows, ids))
      return running_max + jnp.log(total), acc / total[:, None]
    lse, direction = jax.lax.map(one_vector, u.transpose(1, 0, 2), batch_size=_FALLBACK_BLOCK)
    return lse.T, direction.transpose(1, 0, 2) if with_grad else None

  def forward(u, rows, ids, with_grad):
    """(lse `[G, N]`, softmax-weighted rows `[G, N, D]` or None)."""
    c = stabiliser(u, rows, ids)

    def step(carry, chunk):
      total, acc = carry
      e = jnp.exp(chunk_logits(u, *chunk) - c[..., None])
      return (total + e.sum(axis=-1), acc + weighted_rows(e, chunk[0]) if with_grad else acc), None

    init = (jnp.zeros(u.shape[:2], jnp.float32),
            jnp.zeros(u.shape if with_grad else (), jnp.float32))
    (total, acc), _ = jax.lax.scan(step, init, (rows, ids))
    fast = (c + jnp.log(total), acc / total[..., None] if with_grad else None)
    ok = jnp.all(jnp.isfinite(total) & (total > 0)) & jnp.all(jnp.isfinite(acc))
    return jax.lax.cond(ok, lambda: fast, lambda: exact(u, rows, ids, with_grad))

  @jax.custom_vjp
  def lse_fn(u, rows, ids):
    return forward(u, rows, ids, with_grad=False)[0]

  def lse_fwd(u, rows, ids):
    lse, direction = forward(u, rows, ids, with_grad=True)
    return lse, (u, rows, ids, lse, direction)

  def lse_bwd(residuals, g):
    u, rows, ids, lse, direction = residuals
    u_t = u.transpose(0, 2, 1).astype(dtype)  # [G, D, N]

    def step(_, chunk):
      rows_, row_ids = chunk
      p = (jnp.exp(chunk_logits(u, rows_, row_ids) - lse[..., None]) * g[..., None]).astype(dtype)
      return None, jnp.einsum("gdn,gnc->gdc", u_t, p, preferred_element_type=jnp.float32)

    _, drows_t = jax.lax.scan(step, None, (rows, ids))
    du = g[..., None] * direction
    return du.astype(u.dtype), drows_t.transpose(0, 1, 3, 2).astype(rows.dtype), None

  lse_fn.defvjp(lse_fwd, lse_bwd)
  return lse_fn(u, chunks.rows, chunks.ids)


def next_item_log_prob(vectors: Array, log_weights: Array, targets: Array, table: Array,
                       chunk_size: int = 0, dtype=jnp.float32,
                       mesh: Mesh | None = None) -> Array:
  """log p(target) under the mixture of K softmaxes over the whole catalogue: `[T]`.

  Args:
    vectors: `[T, K, D]` user vectors.
    log_weights: `[T, K]` log mixture weights (zeros when K = 1).
    targets: `[T]` item ids in 1..V (0 = no target; its value is meaningless).
    table: `[V, D]` embeddings of items 1..V, or `[K, V, D]`: one table per vector.
  """
  chex.assert_rank(vectors, 3)
  chex.assert_equal_shape_prefix((vectors, log_weights), 2)
  chex.assert_shape(targets, vectors.shape[:1])
  target_rows = table[..., jnp.maximum(targets - 1, 0), :]  # [T, D] or [K, T, D]
  spec = "tkd,td->tk" if table.ndim == 2 else "tkd,ktd->tk"
  target_logits = jnp.einsum(spec, vectors.astype(dtype), target_rows.astype(dtype),
                             preferred_element_type=jnp.float32)
  lse = log_normalizers(vectors, table, chunk_size, dtype, mesh)
  return jax.nn.logsumexp(log_weights + target_logits - lse, axis=-1)


def next_item_nll(vectors: Array, log_weights: Array, targets: Array, table: Array,
                  chunk_size: int = 0, row_block: int = 0, dtype=jnp.float32,
                  mesh: Mesh | None = None) -> Array:
  """Summed -log p(target) over the positions that have a target (`targets > 0`): a scalar.

  With `row_block > 0` (and no 'model' mesh axis) `_row_blocked_nll`, which takes
  the gradients in the same pass; otherwise `-sum(next_item_log_prob)`, with
  `chunk_size` as there. Arguments as `next_item_log_prob`'s.
  """
  with jax.named_scope("next_item_nll"):  # Profiles attribute its ops to this name.
    if row_block > 0 and (mesh is None or mesh.shape.get("model", 1) == 1):
      return _row_blocked_nll(vectors, log_weights, targets, table, row_block, dtype, mesh)
    log_prob = next_item_log_prob(vectors, log_weights, targets, table, chunk_size, dtype, mesh)
    return -jnp.sum(log_prob * (targets > 0))


# `_row_blocked_nll` scores the catalogue in this many parts: two independent
# matmul-exp-matmul chains per block, which the 2 CPU cores run side by side
# (Beauty's output layer ~12% faster than with one part, ~5% than with three or four).
_CATALOGUE_PARTS = 2


def catalogue_bounds(num_items: int) -> list[int]:
  """Where `_row_blocked_nll` splits the catalogue into its `_CATALOGUE_PARTS` parts
  (multiples of 16 items)."""
  parts = max(1, min(_CATALOGUE_PARTS, num_items // 16))
  return [num_items * i // parts // 16 * 16 for i in range(parts)] + [num_items]


def _row_blocked_nll(vectors: Array, log_weights: Array, targets: Array, table: Array,
                     row_block: int, dtype, mesh: Mesh | None) -> Array:
  """`next_item_nll`, `row_block` positions at a time against the whole catalogue.

  Each block's logits `[K, row_block, V]` are exponentiated once and, while
  they are still in cache, summed (the normaliser), multiplied by the table
  (the gradient for the user vectors) and by the user vectors (the gradient
  for the table, accumulated over blocks). The loss is a scalar, so the
  backward pass only scales what the forward pass stored by its one cotangent.
  Per logit that is three matmul terms and one exp, where the streaming
  log-sum-exp (`_streaming_lse`, whose backward pass does not know the
  per-row cotangent in advance) needs four and two. Memory is
  `O(row_block * K * V)`: for catalogues whose block logits fit in cache
  (`auto_row_block`). Each row's stabiliser is fixed before its exps are
  taken (`_blocked_pass`). With a 'data' mesh axis, every block takes
  `row_block` rows of each device's share, so no rows move, and each device
  runs its own blocks (`_per_device`).
  """
  chex.assert_rank(vectors, 3)
  num, k, dim = vectors.shape
  # [K, V, D]: one table per vector (a shared table is repeated; its gradient sums them).
  groups = table if table.ndim == 3 else jnp.broadcast_to(table, (k, *table.shape))
  chex.assert_shape(groups, (k, None, dim))
  num_items = groups.shape[1]
  devices = mesh.shape.get("data", 1) if mesh is not None else 1
  per_device = num // devices
  row_block = min(row_block, per_device)
  num_blocks = -(-per_device // row_block)

  def blocked(x: Array) -> Array:  # [T, ...] -> [blocks, devices * row_block, ...]
    rest = x.shape[1:]
    x = x.reshape(devices, per_device, *rest)
    x = jnp.pad(x, [(0, 0), (0, num_blocks * row_block - per_device)] + [(0, 0)] * len(rest))
    x = x.reshape(devices, num_blocks, row_block, *rest).swapaxes(0, 1)
    return x.reshape(num_blocks, devices * row_block, *rest)

  target_rows = groups[:, jnp.maximum(targets - 1, 0)]  # [K, T, D]
  target_logits = jnp.einsum("tkd,ktd->tk", vectors.astype(dtype), target_rows.astype(dtype),
                             preferred_element_type=jnp.float32)
  bounds = catalogue_bounds(num_items)
  f32 = lambda x: x.astype(jnp.float32)  # Gradients come back in float32 (cast back outside).
  return _blocked_nll(blocked(f32(vectors)).transpose(0, 2, 1, 3), blocked(f32(log_weights)),
                      blocked(target_logits), blocked((targets > 0).astype(jnp.float32)),
                      [f32(groups[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])], dtype,
                      mesh if devices > 1 else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _blocked_nll(u, log_weights, target_logits, weights, parts, dtype, mesh):
  """`_row_blocked_nll` on blocked inputs: u `[B, K, R, D]`, the rest `[B, R, ...]`."""
  return _per_device_pass(u, log_weights, target_logits, weights, parts, dtype, mesh, False)[0]


def _blocked_nll_fwd(u, log_weights, target_logits, weights, parts, dtype, mesh):
  return _per_device_pass(u, log_weights, target_logits, weights, parts, dtype, mesh, True)


def _blocked_nll_bwd(dtype, mesh, grads, cotangent):
  del dtype, mesh
  du, d_log_weights, d_parts = grads
  scale = lambda x: cotangent * x
  return scale(du), scale(d_log_weights), scale(d_log_weights), None, [scale(d) for d in d_parts]


_blocked_nll.defvjp(_blocked_nll_fwd, _blocked_nll_bwd)


def _per_device_pass(u, log_weights, target_logits, weights, parts, dtype, mesh: Mesh | None,
                     with_grad: bool):
  """`_blocked_pass`, each device on its own rows (a `shard_map` over 'data' when `mesh` is
  given), the loss and the table's gradient summed over devices once, after the loop.

  Left to the SPMD partitioner, every block would all-reduce its share of the table's
  gradient (and its stabiliser's `lax.cond` predicate) inside the loop: on several
  CPU devices sharing two cores, such blocking collectives can deadlock.
  """
  run = functools.partial(_blocked_pass, dtype=dtype, with_grad=with_grad)
  if mesh is None:
    return run(u, log_weights, target_logits, weights, parts)

  def summed(*args):
    loss, grads = run(*args)
    if grads is not None:
      du, d_log_weights, d_parts = grads
      grads = du, d_log_weights, [jax.lax.psum(d, "data") for d in d_parts]
    return jax.lax.psum(loss, "data"), grads

  rows = P(None, "data")
  grad_specs = (P(None, None, "data"), rows, P()) if with_grad else None
  return jax.shard_map(summed, mesh=mesh, check_vma=False,
                       in_specs=(P(None, None, "data"), rows, rows, rows, P()),
                       out_specs=(P(), grad_specs))(u, log_weights, target_logits, weights, parts)


def _blocked_pass(u, log_weights, target_logits, weights, parts, dtype, with_grad):
  """(loss, (du, d log_weights, [d part])) of `_blocked_nll` (grads None without `with_grad`).

  d target_logits = d log_weights = -g, where g `[B, R, K]` is each head's
  responsibility for the target times the position's weight.

  Each row's stabiliser c is `_streaming_lse`'s, min(|u| max_v |e_v|, L + 40)
  with L the best logit among the first 128 items: the largest term is at
  least e^-40, and where the bound lies less than `87 - log V` above c no term
  and no sum of V terms can overflow. Rows past that take their best logit
  instead, in a `lax.cond` that runs (one more pass over the block's logits)
  only for a block that holds such a row.
  """
  parts = [p.astype(dtype) for p in parts]
  u_cast = u.astype(dtype)
  row_norm = jnp.sqrt(functools.reduce(jnp.maximum, [
      jnp.max(jnp.sum(jnp.square(p.astype(jnp.float32)), axis=-1), axis=1) for p in parts]))
  safe_gap = _EXP_RANGE - math.log(sum(p.shape[1] for p in parts))

  def block(carry, xs):
    """One block: u_b `[K, R, D]` (u_t `[K, D, R]`, its transpose), the rest `[R, ...]`."""
    u_b, u_t, lw_b, tl_b, w_b = xs
    logits = [jnp.einsum("krd,kvd->krv", u_b, p, preferred_element_type=jnp.float32)
              for p in parts]
    bound = jnp.linalg.norm(u_b.astype(jnp.float32), axis=-1) * row_norm[:, None]  # [K, R]
    c = jnp.minimum(bound, logits[0][..., :_PROBE_ITEMS].max(axis=-1) + _STABILISER_HEADROOM)
    unsafe = bound - c > safe_gap
    best = lambda: functools.reduce(jnp.maximum, [x.max(axis=-1) for x in logits])
    c = jax.lax.cond(jnp.any(unsafe), lambda: jnp.where(unsafe, best(), c), lambda: c)
    exps = [jnp.exp(x - c[..., None]) for x in logits]
    total = sum(e.sum(axis=-1) for e in exps)  # [K, R]
    log_mix = lw_b + tl_b - (c + jnp.log(total)).T  # [R, K]: log w_k + log softmax_k(target)
    log_prob = jax.nn.logsumexp(log_mix, axis=-1)
    loss = -jnp.sum(w_b * log_prob)
    if not with_grad:
      return carry, loss
    g = w_b[:, None] * jnp.exp(log_mix - log_prob[:, None])  # [R, K]
    scale = (g.T / total)[..., None]  # [K, R, 1]: the softmax's normaliser folded in.
    du = scale * sum(jnp.einsum("krv,kvd->krd", e.astype(dtype), p,
                                preferred_element_type=jnp.float32)
                     for e, p in zip(exps, parts))
    scaled_t = (scale.swapaxes(1, 2) * u_t).astype(dtype)  # [K, D, R]
    carry = [acc + jnp.einsum("kdr,krv->kdv", scaled_t, e.astype(dtype),
                              preferred_element_type=jnp.float32)
             for acc, e in zip(carry, exps)]  # The table's gradient, transposed.
    return carry, (loss, du, -g)

  init = ([jnp.zeros((p.shape[0], p.shape[2], p.shape[1]), jnp.float32) for p in parts]
          if with_grad else None)
  carry, out = jax.lax.scan(block, init, (u_cast, u_cast.swapaxes(2, 3), log_weights,
                                          target_logits, weights))
  if not with_grad:
    return jnp.sum(out), None
  loss, du, d_log_weights = out
  return jnp.sum(loss), (du, d_log_weights, [d.swapaxes(1, 2) for d in carry])


def _vector_logits(vectors: Array, table: Array | tuple[Array, ...], dtype,
                   items_first: bool = False) -> list[Array]:
  """Each vector's `[B, C]` logits (`[C, B]` if `items_first`), a plain matmul of its own
  (no `[B, K, C]` buffer whose per-vector slices would be strided). `table`: `[C, D]`,
  `[K, C, D]`, or K `[C, D]` tables."""
  def logits(k):
    rows = (table[k] if isinstance(table, tuple) or table.ndim == 3 else table).astype(dtype)
    users = vectors[:, k].astype(dtype)
    if items_first:
      return jnp.dot(rows, users.T, preferred_element_type=jnp.float32)
    return jnp.dot(users, rows.T, preferred_element_type=jnp.float32)
  return [logits(k) for k in range(vectors.shape[1])]


def _per_user(x: Array, items_first: bool) -> Array:
  """A `[B]` per-user value shaped to broadcast against `[B, C]` (or `[C, B]`) scores."""
  return x[None, :] if items_first else x[:, None]


def _mixture_scores(vectors, log_weights, lse, table, dtype, items_first: bool = False) -> Array:
  """Ranking scores `[B, C]` (`[C, B]` if `items_first`): log p(v) for K > 1, the plain
  logit for K = 1.

  `lse` `[B, K]`: the normalisers over the whole catalogue; None when `table`
  is the whole catalogue (they are computed here).
  """
  per_vector = _vector_logits(vectors, table, dtype, items_first)
  if len(per_vector) == 1:
    return per_vector[0]
  item_axis = 0 if items_first else 1
  if lse is None:
    lse = jnp.stack([jax.nn.logsumexp(x, axis=item_axis) for x in per_vector], axis=1)
  shift = log_weights - lse  # [B, K]
  return functools.reduce(jnp.logaddexp, [_per_user(shift[:, k], items_first) + x
                                          for k, x in enumerate(per_vector)])


# A full-catalogue ranking in which some target has p(target) at or below this is
# redone in the log domain (`_block_ranks`; see `_mixture_probs`).
_RANK_P_FLOOR = 1e-30


def _mixture_probs(vectors, log_weights, table, dtype) -> Array:
  """p(v) `[V, B]` (item-major) over the whole catalogue `table` (K > 1), one exp per logit.

  p(v) = sum_k w_k exp(s_k(v) - c_k) / Z_k orders items as log p(v) does, for a
  third of the exps (log p also needs the log-add). Each user's stabiliser c_k
  is the best of the first 128 logits, not of all: no pass over the scores for
  their maximum. As c_k is at most the best logit, a term exp(s - c) underflows
  only where p_k(v) < e^-87, which, against a target with p > `_RANK_P_FLOOR`,
  is below float32's rounding: every comparison with the target comes out as in
  exact arithmetic. Where c_k lies ~78 or more below the best logit, Z_k may
  overflow, and p is then NaN or 0. `_block_ranks` ranks a block in the log
  domain when one of its targets has p at or below the floor, or NaN.
  """
  logits = _vector_logits(vectors, table, dtype, items_first=True)  # K x [V, B]
  # The probe's own small matmul, so that the stabiliser does not wait for the [V, B]
  # logits: XLA:CPU then fuses each vector's matmul, max and exp into one kernel
  # (2-4% off the ranking on 2 cores, benchmarks/README.md).
  probe = (tuple(t[:_PROBE_ITEMS] for t in table) if isinstance(table, tuple)
           else table[..., :_PROBE_ITEMS, :])
  stabilisers = [x.max(axis=0) for x in _vector_logits(vectors, probe, dtype, items_first=True)]
  shifted = [jnp.exp(x - c) for x, c in zip(logits, stabilisers)]
  coef = jnp.exp(log_weights) / jnp.stack([e.sum(axis=0) for e in shifted], axis=1)  # [B, K]
  return sum(coef[None, :, k] * e for k, e in enumerate(shifted))


def target_ranks(vectors: Array, log_weights: Array, targets: Array, exclude: Array,
                 table: Array, chunk_size: int = 0, dtype=jnp.float32,
                 mesh: Mesh | None = None, user_block: int = CPU_USER_BLOCK,
                 exclude_is_distinct: bool = False) -> Array:
  """0-based rank of each target among all items: `[B]` int32.

  The rank is the number of *other* candidate items whose score is >= the
  target's, so ties count against the model. Items listed in `exclude` (the
  user's history, 0-padded) are not candidates; the target itself is always
  scored by the model, even when it also occurs in the history.

  Users are ranked `user_block` at a time (a `lax.map` over blocks), so that a
  block's `[user_block, K, V]` scores stay in cache while they are normalised,
  mixed, compared and counted: ~4x faster on CPU than one pass over the whole
  batch, whose scores would make several round trips through memory.

  Args:
    vectors: `[B, K, d]` user vectors at the last history position.
    log_weights: `[B, K]`.
    targets: `[B]` item ids in 1..V.
    exclude: `[B, X]` item ids to drop from the ranking, 0 = none; an id listed twice is
      dropped once.
    table: `[V, D]`, or `[K, V, D]`: one table per vector.
    chunk_size: items scored at a time (0 = all at once).
    mesh: with a 'model' axis, chunks are split over it (see `_chunked_table`).
    user_block: users ranked together (0 = the whole batch); used when it divides B.
    exclude_is_distinct: the caller vouches that no row of `exclude` lists an id twice
      (`data.eval_data` builds them so), which saves sorting them here.
  """
  chex.assert_rank([vectors, log_weights, targets, exclude], [3, 2, 1, 2])
  batch = vectors.shape[0]
  # Only excluded ids that are not the target count; the rest point nowhere.
  exclude = jnp.where(exclude != targets[:, None], exclude, 0)
  whole_catalogue = chunk_size <= 0 or chunk_size >= table.shape[-2]
  if whole_catalogue and not exclude_is_distinct:
    exclude = _distinct(exclude)  # `_block_ranks` subtracts each listed item once.
  if table.ndim == 3 and whole_catalogue:
    # One array per vector, sliced here once: a slice inside the loop over user blocks
    # is a copy of the table at every block (XLA:CPU does not hoist it).
    table = tuple(table[k] for k in range(table.shape[0]))
  rank = functools.partial(_block_ranks, table=table, chunk_size=chunk_size, dtype=dtype,
                           mesh=mesh)
  if not 0 < user_block < batch or batch % user_block:
    return rank(vectors, log_weights, targets, exclude)
  blocks = batch // user_block
  args = (vectors, log_weights, targets, exclude)
  ranks = jax.lax.map(lambda a: rank(*a),
                      tuple(x.reshape(blocks, user_block, *x.shape[1:]) for x in args))
  return ranks.reshape(batch)


def _distinct(ids: Array) -> Array:
  """Each row of `[B, X]` ids, sorted, with repeats replaced by 0."""
  ids = jnp.sort(ids, axis=1)
  repeats = ids[:, 1:] == ids[:, :-1]
  return jnp.concatenate([ids[:, :1], jnp.where(repeats, 0, ids[:, 1:])], axis=1)


def _block_ranks(vectors: Array, log_weights: Array, targets: Array, exclude: Array, *,
                 table: Array | tuple[Array, ...], chunk_size: int, dtype,
                 mesh: Mesh | None) -> Array:
  """`target_ranks` for one block of users (`exclude` no longer lists the target, nor, for
  the whole catalogue, any id twice; `table` may come as a tuple of per-vector tables, for
  the whole catalogue only)."""
  num_items = table[0].shape[0] if isinstance(table, tuple) else table.shape[-2]
  batch = vectors.shape[0]
  rows = jnp.arange(batch)[:, None]

  def candidate_mask(item_ids: Array, excluded_columns: Array) -> Array:
    """`[B, C]`: True where the column is a real, non-excluded item other than the target.

    `excluded_columns` `[B, X]` are column indices into this chunk (out of range = none).
    """
    width = item_ids.shape[-1]
    excluded = jnp.zeros((batch, width), bool).at[rows, excluded_columns].set(True, mode="drop")
    return (item_ids[None, :] > 0) & ~excluded & (item_ids[None, :] != targets[:, None])

  if chunk_size <= 0 or chunk_size >= num_items:  # Scores computed once, item-major: [V, B].
    # Item-major, each head's matmul runs ~2x faster on CPU than [B, V] (a [V, D] x [D, B]
    # product), and the sums over items add whole rows of B users.
    excluded = exclude.T  # [X, B]

    def count(scores):
      """The items that score at least the target's, less the target and the excluded
      items among them: no `[V, B]` candidate mask (7% off the ranking on 2 cores)."""
      target_score = jnp.take_along_axis(scores, (targets - 1)[None, :], axis=0)  # [1, B]
      # Summed in float32 (exact below 2^24): XLA:CPU then sums with YNNPACK, where an
      # int32 sum goes through a slower tree of reduce-windows (~10% of the ranking).
      sum_dtype = jnp.int32 if num_items >= 2**24 else jnp.float32
      at_least = jnp.sum(scores >= target_score, axis=0, dtype=sum_dtype).astype(jnp.int32)
      # Read from the same scores, each excluded item compares as it did in that sum.
      excluded_scores = jnp.take_along_axis(scores, jnp.maximum(excluded - 1, 0), axis=0)
      excluded_at_least = jnp.sum((excluded > 0) & (excluded_scores >= target_score), axis=0,
                                  dtype=jnp.int32)
      return at_least - 1 - excluded_at_least, target_score

    def log_domain():
      return count(_mixture_scores(vectors, log_weights, None, table, dtype, items_first=True))[0]

    if vectors.shape[1] == 1:
      return log_domain()  # Plain logits.
    ranks, target_p = count(_mixture_probs(vectors, log_weights, table, dtype))
    # Below the floor, items whose terms underflowed could outrank the target.
    return jax.lax.cond(jnp.all(target_p > _RANK_P_FLOOR), lambda: ranks, log_domain)

  lse = (log_normalizers(vectors, table, chunk_size, dtype, mesh)
         if vectors.shape[1] > 1 else jnp.zeros(vectors.shape[:2], jnp.float32))
  chunks = _chunked_table(table, chunk_size, mesh)
  shared = table.ndim == 2  # Chunk rows are [1, C, D] for one shared table.
  exclude_chunk, exclude_column = chunks.locate(exclude)
  exclude_chunk = jnp.where(exclude > 0, exclude_chunk, -1)
  ids, chunk_index = chunks.ids, jnp.arange(chunks.num)

  def find_target(total, chunk):
    rows_, row_ids = chunk
    scores = _mixture_scores(vectors, log_weights, lse, rows_[0] if shared else rows_, dtype)
    return total + jnp.sum(jnp.where(row_ids[None, :] == targets[:, None], scores, 0.0),
                           axis=1), None

  target_score, _ = jax.lax.scan(find_target, jnp.zeros((batch,), jnp.float32),
                                 (chunks.rows, ids))

  def count(total, chunk):
    rows_, row_ids, index = chunk
    scores = _mixture_scores(vectors, log_weights, lse, rows_[0] if shared else rows_, dtype)
    columns = jnp.where(exclude_chunk == index, exclude_column, row_ids.shape[-1])
    better = candidate_mask(row_ids, columns) & (scores >= target_score[:, None])
    return total + jnp.sum(better, axis=1, dtype=jnp.int32), None

  ranks, _ = jax.lax.scan(count, jnp.zeros((batch,), jnp.int32), (chunks.rows, ids, chunk_index))
  return ranks


def auto_chunk_size(backend: str, rows: int, num_vectors: int, num_items: int) -> int:
  """Items per chunk of the training cross-entropy when the config asks for -1 (auto).

  `rows` is the number of scored positions per device. On CPU, 1024: a chunk's
  logits stay in cache, which makes the step ~2x faster than scoring the whole
  catalogue at once (benchmarks/README.md). On GPU/TPU, 0: one matmul over the
  whole catalogue instead of a loop of small ones (on a GPU, XLA reads a loop's
  predicate back to the host at every iteration); chunks only where the float32
  `[rows, K, V]` logits would exceed `AUTO_LOGITS_BYTES`, and then the largest
  multiple of 1024 items that fits. (On an H200 the Beauty step took the same
  time either way: benchmarks/README.md.)
  """
  if backend == "cpu":
    return CPU_CHUNK_SIZE
  bytes_per_item = max(rows * num_vectors * 4, 1)
  if bytes_per_item * num_items <= AUTO_LOGITS_BYTES:
    return 0
  return max(CPU_CHUNK_SIZE, AUTO_LOGITS_BYTES // bytes_per_item // CPU_CHUNK_SIZE * CPU_CHUNK_SIZE)


# `auto_row_block`'s limits: rows per block, and bytes of a block's float32 logits.
# 15 MiB keeps the whole train step's temporaries under the 64 MiB that glibc
# serves without page faults (see `runtime.keep_freed_host_memory`): FAME's
# default steps take Beauty 47.6 MiB (155 rows), Sports 48.6 (100), Toys 46.0
# (150), Yelp 60.2 (96; tests/test_runtime.py checks it stays under). Sports
# with 140-row blocks (then 73 MB) page-faulted 17,000 times a step and ran 25%
# slower than with item chunks.
AUTO_ROW_BLOCK_ROWS = 160
AUTO_ROW_BLOCK_BYTES = 15 << 20
_MIN_ROW_BLOCK = 32


def auto_row_block(backend: str, rows: int, num_vectors: int, num_items: int) -> int:
  """Rows per block of the training loss (`next_item_nll`) when the config asks for -1.

  `rows` is the number of scored positions per device. On CPU: as few blocks as
  allow at most `AUTO_ROW_BLOCK_ROWS` rows whose `[rows, K, V]` float32 logits
  fit `AUTO_ROW_BLOCK_BYTES`, and rows spread evenly over them (the last block
  padded by less than one row per block). 0 (the chunked streaming loss of
  `auto_chunk_size`) where fewer than 32 rows would fit, and on GPU/TPU: on an
  H200 one block of all 1,550 rows of a Beauty step took 1.86 ms of kernel time
  against 1.88 ms for the default, and two blocks 2.10 ms (benchmarks/README.md).
  """
  if backend != "cpu":
    return 0
  limit = min(AUTO_ROW_BLOCK_ROWS, AUTO_ROW_BLOCK_BYTES // max(num_vectors * num_items * 4, 1))
  if limit < _MIN_ROW_BLOCK:
    return 0
  blocks = -(-rows // limit)
  return -(-rows // blocks)


def auto_user_block(backend: str) -> int:
  """Users ranked together (`target_ranks`'s `user_block`) when the config asks for -1.

  128 on CPU (a block's scores stay in cache: ~4x faster than the whole batch; on a
  2-core Xeon, with item-major scores, 6% faster than 64 and 20% than 32,
  benchmarks/README.md); on GPU/TPU the whole batch (0), without a loop over
  blocks: on an H200 that took a Beauty validation pass from 0.25 to 0.095 s.
  """
  return CPU_USER_BLOCK if backend == "cpu" else 0


def auto_eval_batch_size(backend: str, num_vectors: int, num_items: int) -> int:
  """Users per evaluation batch when `config.eval_batch_size` is -1.

  512 on CPU. On GPU/TPU, where a pass of 512-user batches is mostly dispatch
  (an H200 ranked Beauty's 22,363 validation users in 0.062 s in 44 batches and
  0.012 s in 3 of 8,192, benchmarks/README.md): the most users, up to 8,192 and
  in multiples of 512, whose `[users, K, items]` float32 scores fit
  `AUTO_LOGITS_BYTES` (at least 512).
  """
  if backend == "cpu":
    return CPU_EVAL_BATCH_SIZE
  fits = AUTO_LOGITS_BYTES // (4 * num_vectors * num_items)
  return int(np.clip(fits // CPU_EVAL_BATCH_SIZE * CPU_EVAL_BATCH_SIZE, CPU_EVAL_BATCH_SIZE,
                     16 * CPU_EVAL_BATCH_SIZE))


METRIC_KS = (5, 10, 20)


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
  """HR@K, NDCG@K (K = 5, 10, 20) and MRR from 0-based ranks (one relevant item each)."""
  ranks = np.asarray(ranks, dtype=np.float64)
  out = {}
  for k in METRIC_KS:
    hit = ranks < k
    out[f"HR@{k}"] = float(hit.mean())
    out[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
  out["MRR"] = float((1.0 / (ranks + 1.0)).mean())
  return out
