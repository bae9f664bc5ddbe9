"""Full-catalogue scoring: ranks, metrics and the (chunked) next-item log-likelihood.

Reference: brute-force NumPy over every item. Vectors and item tables are
small integers where ties matter, so float32 dot products are exact and ties
are real ties.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from fame_jax import scoring

V = 37  # Catalogue size; the chunk sizes below do not divide it.
CHUNK_SIZES = [0, 5, 16, V, 64]


def tied_problem(k: int, seed: int = 0):
  """Users and items with many exact ties.

  Items 1..V have small-integer embeddings; items 30..37 duplicate items 1..8.
  User 0 has all-zero vectors (every item ties: no hits). Exclusion lists hold
  padding zeros, duplicates and, for some users, the target itself.
  """
  rng = np.random.default_rng(seed)
  d, users = 6, 12
  table = rng.integers(-2, 3, (V, d)).astype(np.float32)
  table[29:] = table[:8]
  vectors = rng.integers(-2, 3, (users, k, d)).astype(np.float32)
  vectors[0] = 0.0
  log_weights = (np.log(rng.dirichlet(np.ones(k), users)) if k > 1
                 else np.zeros((users, 1))).astype(np.float32)
  targets = rng.integers(1, V + 1, users).astype(np.int32)
  targets[1] = 3  # Item 3 has a duplicate (item 32) ...
  targets[2] = 32  # ... and the other way round.
  exclude = np.zeros((users, 9), np.int32)
  for u in range(users):
    n = rng.integers(0, 8)
    exclude[u, :n] = rng.integers(1, V + 1, n)
  exclude[3, :4] = [targets[3], 7, 7, targets[3]]  # Target in the history, duplicates.
  exclude[4, :3] = [targets[4], 0, 5]  # A zero in the middle.
  exclude[5] = 0  # Nothing excluded.
  return vectors, log_weights, targets, exclude, table


def per_vector_tables(table: np.ndarray, k: int, seed: int = 1) -> np.ndarray:
  """`[K, V, d]`: table k is `table` with its columns permuted and signs flipped (ties kept)."""
  rng = np.random.default_rng(seed)
  return np.stack([table[:, rng.permutation(table.shape[1])] * rng.choice([-1, 1], table.shape[1])
                   for _ in range(k)]).astype(table.dtype)


def reference_scores(vectors, log_weights, table) -> np.ndarray:
  """[U, V]: the plain logit for K = 1, log p(v) for K > 1 (both rank identically for K = 1)."""
  vectors, log_weights, table = (np.asarray(a, np.float64) for a in (vectors, log_weights, table))
  if vectors.shape[1] == 1:
    return vectors[:, 0] @ (table if table.ndim == 2 else table[0]).T
  return ref.mixture_log_prob(vectors, log_weights, table)


@functools.partial(jax.jit, static_argnames=("chunk_size", "user_block", "exclude_is_distinct"))
def ranks_fn(vectors, log_weights, targets, exclude, table, chunk_size, user_block=0,
             exclude_is_distinct=False):
  return scoring.target_ranks(vectors, log_weights, targets, exclude, table, chunk_size,
                              user_block=user_block, exclude_is_distinct=exclude_is_distinct)


@pytest.mark.parametrize("tables", ["shared", "per_vector"])
@pytest.mark.parametrize("user_block", [0, 4])  # 4: three blocks of the 12 users.
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("k", [1, 3])
def test_target_ranks_equal_brute_force_with_ties_and_history_exclusion(k, chunk_size, user_block,
                                                                         tables):
  vectors, log_weights, targets, exclude, table = tied_problem(k)
  if tables == "per_vector":  # [K, V, d]: vector k scores against its own table (Eq. 9).
    table = per_vector_tables(table, k)
  ranks = np.asarray(ranks_fn(vectors, log_weights, targets, exclude, table,
                              chunk_size=chunk_size, user_block=user_block))
  scores = reference_scores(vectors, log_weights, table)
  tol = 0.0 if k == 1 else 1e-5  # K = 1: exact integer scores.
  expected = [ref.brute_force_rank(scores[u], targets[u], exclude[u], tol)
              for u in range(len(targets))]
  np.testing.assert_array_equal(ranks, expected)
  # User 0 scores everything equally: every other candidate ties with the target.
  num_candidates = V - len(set(exclude[0][exclude[0] > 0]) - {targets[0]})
  assert ranks[0] == num_candidates - 1 > 20
  # The duplicates of items 1..8 are tied with them and count against the target.
  assert ranks[1] == ref.brute_force_rank(scores[1], 3, exclude[1], tol)
  assert scores[1, 3 - 1] == scores[1, 32 - 1]
  assert ranks[1] >= 1 or 32 in exclude[1]


@pytest.mark.parametrize("k", [1, 3])
def test_exclusion_lists_vouched_distinct_rank_as_brute_force(k):
  """What evaluation passes (`data.eval_data` lists each history item once): no sort."""
  vectors, log_weights, targets, exclude, table = tied_problem(k)
  distinct = np.zeros_like(exclude)
  for u, row in enumerate(exclude):
    ids = np.unique(row[row > 0])
    distinct[u, :len(ids)] = ids[::-1]  # Any order, zeros anywhere after.
  assert (distinct != exclude).any()  # The duplicates of tied_problem are gone.
  ranks = np.asarray(ranks_fn(vectors, log_weights, targets, distinct, table, chunk_size=0,
                              user_block=4, exclude_is_distinct=True))
  scores = reference_scores(vectors, log_weights, table)
  tol = 0.0 if k == 1 else 1e-5
  expected = [ref.brute_force_rank(scores[u], targets[u], distinct[u], tol)
              for u in range(len(targets))]
  np.testing.assert_array_equal(ranks, expected)


def test_target_in_history_stays_a_candidate():
  """Excluding the target is a no-op: its score still decides its rank."""
  vectors, log_weights, targets, _, table = tied_problem(1)
  no_history = np.zeros((len(targets), 2), np.int32)
  target_only = np.stack([targets, targets], axis=1)
  for chunk_size in (0, 5):
    a = ranks_fn(vectors, log_weights, targets, no_history, table, chunk_size=chunk_size)
    b = ranks_fn(vectors, log_weights, targets, target_only, table, chunk_size=chunk_size)
    np.testing.assert_array_equal(a, b)


def test_excluded_items_are_never_counted():
  """Excluding every item that beats the target puts it at rank 0 (a hit at every K)."""
  vectors, log_weights, targets, _, table = tied_problem(1, seed=4)
  scores = reference_scores(vectors, log_weights, table)
  for u in range(1, len(targets)):  # User 0 ties everything; skip it.
    better = [v for v in range(1, V + 1) if v != targets[u] and scores[u, v - 1] >= scores[u, targets[u] - 1]]
    exclude = np.zeros((1, V), np.int32)
    exclude[0, :len(better)] = better
    for chunk_size in (0, 5):
      rank = ranks_fn(vectors[u:u + 1], log_weights[u:u + 1], targets[u:u + 1], exclude, table,
                      chunk_size=chunk_size)
      assert int(rank[0]) == 0


def test_all_equal_scores_give_no_hits():
  vectors = np.zeros((4, 1, 3), np.float32)
  table = np.ones((V, 3), np.float32)
  targets = np.array([1, 2, 3, V], np.int32)
  ranks = np.asarray(ranks_fn(vectors, np.zeros((4, 1), np.float32), targets,
                              np.zeros((4, 1), np.int32), table, chunk_size=0))
  np.testing.assert_array_equal(ranks, V - 1)
  metrics = scoring.metrics_from_ranks(ranks)
  assert all(metrics[f"{m}@{k}"] == 0.0 for m in ("HR", "NDCG") for k in (5, 10, 20))


def test_metrics_from_ranks_equal_brute_force():
  rng = np.random.default_rng(0)
  ranks = np.concatenate([rng.integers(0, 40, 500), [0, 4, 5, 9, 10, 19, 20]])
  metrics = scoring.metrics_from_ranks(ranks)
  expected = ref.brute_force_metrics(list(ranks))
  assert set(metrics) == set(expected)
  for name, value in expected.items():
    assert metrics[name] == pytest.approx(value, rel=1e-12), name
  # A single user ranked first scores 1 everywhere; ranked exactly K is a miss at K.
  assert scoring.metrics_from_ranks(np.array([0])) == pytest.approx(
      {**{f"{m}@{k}": 1.0 for m in ("HR", "NDCG") for k in (5, 10, 20)}, "MRR": 1.0})
  assert scoring.metrics_from_ranks(np.array([10]))["HR@10"] == 0.0
  assert scoring.metrics_from_ranks(np.array([9]))["NDCG@10"] == pytest.approx(1 / np.log2(11))


def random_loss_problem(k: int, seed: int = 1):
  rng = np.random.default_rng(seed)
  t, d = 11, 8
  vectors = rng.normal(size=(t, k, d)).astype(np.float32)
  log_weights = (np.log(rng.dirichlet(np.ones(k), t)) if k > 1 else np.zeros((t, 1))).astype(np.float32)
  targets = rng.integers(1, V + 1, t).astype(np.int32)
  targets[-2:] = 0  # No target: value meaningless, but must be finite.
  table = rng.normal(size=(V, d)).astype(np.float32)
  return vectors, log_weights, targets, table


@pytest.mark.parametrize("tables", ["shared", "per_vector"])
@pytest.mark.parametrize("k", [1, 4])
def test_next_item_log_prob_matches_numpy_and_chunking_changes_nothing(k, tables):
  vectors, log_weights, targets, table = random_loss_problem(k)
  if tables == "per_vector":
    table = per_vector_tables(table, k)
  expected = ref.mixture_log_prob(vectors.astype(np.float64), log_weights.astype(np.float64),
                                  table.astype(np.float64))
  expected = expected[np.arange(len(targets)), np.maximum(targets, 1) - 1]

  def loss(vectors, log_weights, table, chunk_size):
    log_p = scoring.next_item_log_prob(vectors, log_weights, jnp.asarray(targets), table, chunk_size)
    return -jnp.sum(jnp.where(targets > 0, log_p, 0.0)), log_p

  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                    static_argnums=3)
  (value0, log_p0), grads0 = grad_fn(vectors, log_weights, table, 0)
  valid = targets > 0
  np.testing.assert_allclose(log_p0[valid], expected[valid], rtol=1e-5, atol=1e-5)
  assert np.isfinite(np.asarray(log_p0)).all()
  for chunk_size in (1, 5, 16):  # 1: every chunk full; 5, 16: the last one padded.
    (value, log_p), grads = grad_fn(vectors, log_weights, table, chunk_size)
    np.testing.assert_allclose(log_p[valid], log_p0[valid], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value, value0, rtol=1e-5)
    for g, g0 in zip(grads, grads0):
      np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(grads[2])).max() > 0  # The item table does get a gradient.


@pytest.mark.parametrize("tables", ["shared", "per_vector"])
@pytest.mark.parametrize("k", [1, 4])
def test_row_blocked_loss_and_gradients_equal_the_streamed_ones(k, tables):
  """`next_item_nll` with row blocks takes its gradients in the forward pass; they must
  be those of the plain loss, whatever the block size (the catalogue in two parts)."""
  vectors, log_weights, targets, table = random_loss_problem(k, seed=3)
  if tables == "per_vector":
    table = per_vector_tables(table, k)

  @functools.partial(jax.jit, static_argnums=(3, 4))
  def loss_and_grads(vectors, log_weights, table, chunk_size, row_block):
    nll = lambda *a: scoring.next_item_nll(*a[:2], jnp.asarray(targets), a[2], chunk_size,
                                           row_block)
    return jax.value_and_grad(nll, argnums=(0, 1, 2))(vectors, log_weights, table)

  expected = -ref.mixture_log_prob(vectors.astype(np.float64), log_weights.astype(np.float64),
                                   table.astype(np.float64))
  expected = expected[np.arange(len(targets)), np.maximum(targets, 1) - 1][targets > 0].sum()
  value0, grads0 = loss_and_grads(vectors, log_weights, table, 0, 0)
  np.testing.assert_allclose(value0, expected, rtol=1e-5)
  for row_block in (1, 4, 11, 16):  # 11 positions: 4 pads the last block, 16 the only one.
    value, grads = loss_and_grads(vectors, log_weights, table, 5, row_block)
    np.testing.assert_allclose(value, value0, rtol=1e-5)
    for g, g0 in zip(grads, grads0):
      np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(grads[2])).max() > 0


@pytest.mark.parametrize("regime", ["probe_bounded", "far_below_the_bound",
                                    "spread_beyond_the_stabiliser"])
def test_row_blocked_loss_is_exact_at_extreme_logits(regime):
  """The row-blocked loss fixes its stabiliser as the streamed one does (see below); a row
  whose Cauchy-Schwarz bound lies too far above it (its sum could overflow) takes its
  best logit instead. probe_bounded: logits 35-50 nats under the bound, so the
  stabiliser is the probe's best logit plus 40."""
  if regime == "probe_bounded":
    table = np.linspace(1.0, 0.7, V, dtype=np.float32)[:, None]
    vectors = np.array([[[-50.0]], [[-40.0]], [[-45.0]]], np.float32)
  elif regime == "far_below_the_bound":
    table = np.linspace(1.0, 0.7, V, dtype=np.float32)[:, None]
    vectors = np.array([[[-300.0]], [[-250.0]], [[-280.0]]], np.float32)
  else:
    table = np.linspace(-1.0, 1.0, V, dtype=np.float32)[:, None]
    vectors = np.array([[[1000.0]], [[2.0]], [[-3.0]]], np.float32)
  targets = np.array([5, 30, 0], np.int32)
  log_weights = np.zeros((3, 1), np.float32)
  nll = lambda v, t: scoring.next_item_nll(v, log_weights, jnp.asarray(targets), t, row_block=2)
  value, (grad_vectors, grad_table) = jax.value_and_grad(nll, argnums=(0, 1))(
      jnp.asarray(vectors), jnp.asarray(table))
  logits = vectors[:, 0].astype(np.float64) @ table.T.astype(np.float64)  # [3, V]
  weights = (targets > 0).astype(np.float64)
  rows = np.arange(3)
  np.testing.assert_allclose(
      value, np.sum(weights * (ref.logsumexp(logits) - logits[rows, targets - 1])), rtol=1e-6)
  expected_vectors, expected_table = reference_lse_gradients(vectors, table, weights)
  onehot = np.zeros((3, V))
  onehot[rows, targets - 1] = weights
  expected_vectors = expected_vectors - (onehot @ table.astype(np.float64))[:, None]
  expected_table = expected_table - onehot.T @ vectors[:, 0].astype(np.float64)
  np.testing.assert_allclose(grad_vectors, expected_vectors, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad_table, expected_table, rtol=1e-4, atol=1e-6)


def test_next_item_log_prob_gradient_matches_numpy_softmax_gradient():
  """d(-log p(y))/d logits = softmax - onehot for K = 1, checked on the user vectors."""
  vectors, log_weights, targets, table = random_loss_problem(1, seed=2)
  targets = np.maximum(targets, 1)
  grad = jax.grad(lambda v: -scoring.next_item_log_prob(
      v, log_weights, jnp.asarray(targets), table, chunk_size=5).sum())(vectors)
  logits = vectors[:, 0].astype(np.float64) @ table.T.astype(np.float64)
  probs = ref.softmax(logits)
  probs[np.arange(len(targets)), targets - 1] -= 1.0
  np.testing.assert_allclose(grad[:, 0], probs @ table.astype(np.float64), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [0, 5])
def test_log_normalizers_are_stable_for_large_logits(chunk_size):
  vectors = np.full((2, 1, 1), 1000.0, np.float32)
  table = np.linspace(-1, 1, V, dtype=np.float32)[:, None]
  lse = np.asarray(scoring.log_normalizers(jnp.asarray(vectors), jnp.asarray(table), chunk_size))
  expected = ref.logsumexp(1000.0 * table[:, 0].astype(np.float64))
  np.testing.assert_allclose(lse, expected, rtol=1e-6)


def reference_lse_gradients(vectors, table, weights):
  """d/d(vectors, table) of sum(weights * logsumexp_v <vectors, table_v>), K = 1, float64."""
  vectors, table = vectors[:, 0].astype(np.float64), table.astype(np.float64)
  probs = ref.softmax(vectors @ table.T)  # [T, V]
  return (weights[:, None] * (probs @ table))[:, None], (probs * weights[:, None]).T @ vectors


@pytest.mark.parametrize("chunk_size", [5, 16])
@pytest.mark.parametrize("regime", ["far_below_the_bound", "spread_beyond_the_stabiliser"])
def test_streamed_log_normalizers_and_gradients_are_exact_at_extreme_logits(regime, chunk_size):
  """The streamed pass fixes each row's stabiliser before it sees the logits.

  far_below_the_bound: every logit lies 500+ nats under the Cauchy-Schwarz
  bound |u| max|e| (a stabiliser from the bound alone would underflow every
  term); the best of the first items must pull it down. spread_beyond_the_stabiliser:
  one row's logits spread over 2,000 nats, far more than the headroom above the
  first items, so the stabilised sum overflows and the exact fallback must take
  the batch (the other row, an ordinary one, included).
  """
  if regime == "far_below_the_bound":
    table = np.linspace(1.0, 0.7, V, dtype=np.float32)[:, None]  # Item 1 worst, item V best.
    vectors = np.array([[[-300.0]], [[-250.0]]], np.float32)
  else:
    table = np.linspace(-1.0, 1.0, V, dtype=np.float32)[:, None]
    vectors = np.array([[[1000.0]], [[2.0]]], np.float32)
  weights = np.array([0.3, 0.7], np.float32)
  loss = lambda v, t: jnp.sum(scoring.log_normalizers(v, t, chunk_size)[:, 0] * weights)
  value, (grad_vectors, grad_table) = jax.value_and_grad(loss, argnums=(0, 1))(
      jnp.asarray(vectors), jnp.asarray(table))
  logits = vectors[:, 0].astype(np.float64) @ table.T.astype(np.float64)
  np.testing.assert_allclose(value, np.sum(ref.logsumexp(logits) * weights), rtol=1e-6)
  expected_vectors, expected_table = reference_lse_gradients(vectors, table, weights)
  np.testing.assert_allclose(grad_vectors, expected_vectors, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad_table, expected_table, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("user_block", [0, 2])
def test_ranks_stay_exact_when_the_target_probability_underflows(user_block):
  """Peaked mixtures: the target lies ~1000 nats below every head's best item.

  Its probability underflows float32, as do those of all items below it; the
  rank must still count only the items that truly score higher.
  """
  table = np.linspace(-1.0, 1.0, V, dtype=np.float32)[:, None]  # [V, 1]: item i+1 -> table[i]
  vectors = np.array([[[1000.0], [900.0]]] * 4, np.float32)  # [4 users, K=2, 1]
  log_weights = np.log(np.full((4, 2), 0.5, np.float32))
  targets = np.array([19, 2, 30, V], np.int32)  # Middle, near the bottom, high, the best item.
  exclude = np.zeros((4, 1), np.int32)
  ranks = np.asarray(ranks_fn(vectors, log_weights, targets, exclude, table, chunk_size=0,
                              user_block=user_block))
  np.testing.assert_array_equal(ranks, V - targets)  # Exactly the items with a larger value.


def test_ranks_are_exact_where_the_probability_stabiliser_overflows_or_sits_below_the_best():
  """The full-catalogue ranking stabilises p with the best of the first 128 logits
  (`scoring._mixture_probs`); here the best items come after them, a little above
  (user 0) or far above (user 1: the normalisers overflow, and the block is ranked
  in the log domain)."""
  values = np.concatenate([np.linspace(-0.5, 0.0, 128), np.linspace(0.01, 1.0, 172)])
  table = values.astype(np.float32)[:, None]  # [V, 1]: item i + 1 -> values[i]
  vectors = np.array([[[60.0], [50.0]], [[500.0], [450.0]]], np.float32)  # [2 users, K=2, 1]
  log_weights = np.log(np.array([[0.3, 0.7]] * 2, np.float32))
  targets = np.array([200, 129], np.int32)
  exclude = np.zeros((2, 1), np.int32)
  for user_block in (0, 1):
    ranks = np.asarray(ranks_fn(vectors, log_weights, targets, exclude, table, chunk_size=0,
                                user_block=user_block))
    np.testing.assert_array_equal(ranks, len(values) - targets)  # The items with a larger value.


def test_ranks_are_exact_for_a_target_just_above_the_probability_floor():
  """Two heads ranking items in opposite orders, the target's head weighted e^-23:
  the target's p is ~e^-67, just above the ranking's floor (1e-30), and an item
  2 nats above it gets its p through the other head. The rank counts it."""
  rest = np.linspace(-0.9, 0.9, 170)
  values = np.concatenate([[1.0, -1.0], np.linspace(-0.3, 0.3, 126), rest, [0.56, -0.35]])
  table = values.astype(np.float32)[:, None]
  vectors = np.array([[[100.0], [-100.0]]], np.float32)
  log_weights = np.array([[-23.0, np.log1p(-np.exp(-23.0))]], np.float32)
  targets = np.array([len(values) - 1], np.int32)  # x = 0.56; item V has x = -0.35.
  exclude = np.zeros((1, 1), np.int32)
  scores = reference_scores(vectors, log_weights, table)[0]  # log p, float64
  target = targets[0]
  assert np.log(1e-30) < scores[target - 1] < np.log(1e-25)
  assert scores[-1] > scores[target - 1] + 1.0  # The competitor, through head 2.
  ranks = np.asarray(ranks_fn(vectors, log_weights, targets, exclude, table, chunk_size=0))
  assert ranks[0] == ref.brute_force_rank(scores, target, exclude[0])


def test_auto_chunk_size_streams_on_cpu_and_scores_whole_catalogue_on_accelerators():
  assert scoring.auto_chunk_size("cpu", rows=1550, num_vectors=2, num_items=12_101) == 1024
  assert scoring.auto_chunk_size("gpu", rows=1550, num_vectors=2, num_items=12_101) == 0
  assert scoring.auto_chunk_size("tpu", rows=1550, num_vectors=2, num_items=12_101) == 0


def test_auto_chunk_size_keeps_accelerator_logits_under_the_budget():
  rows, k, items = 12_800, 2, 10_000_000  # 1 TB of logits if materialised.
  chunk = scoring.auto_chunk_size("gpu", rows=rows, num_vectors=k, num_items=items)
  assert chunk > 0 and chunk % 1024 == 0
  assert rows * k * chunk * 4 <= scoring.AUTO_LOGITS_BYTES
  assert rows * k * (chunk + 1024) * 4 > scoring.AUTO_LOGITS_BYTES  # The largest that fits.


@pytest.mark.parametrize("rows,k,items", [(1550, 2, 12_101), (1400, 2, 18_357), (1553, 2, 12_101),
                                          (12_800, 1, 12_101), (70, 2, 12_101), (1550, 2, 40_000)])
def test_auto_row_block_fits_the_budget_with_the_fewest_blocks_and_little_padding(rows, k, items):
  block = scoring.auto_row_block("cpu", rows=rows, num_vectors=k, num_items=items)
  assert scoring._MIN_ROW_BLOCK <= block <= min(rows, scoring.AUTO_ROW_BLOCK_ROWS)  # pylint: disable=protected-access
  assert block * k * items * 4 <= scoring.AUTO_ROW_BLOCK_BYTES
  blocks = -(-rows // block)
  assert blocks * block - rows < blocks  # Padding: less than a row per block.
  limit = min(scoring.AUTO_ROW_BLOCK_ROWS, scoring.AUTO_ROW_BLOCK_BYTES // (k * items * 4))
  assert blocks == -(-rows // limit)  # No more blocks than the limit needs.


def test_auto_row_block_is_off_for_large_catalogues_and_on_accelerators():
  assert scoring.auto_row_block("cpu", rows=1550, num_vectors=2, num_items=12_101) == 155
  assert scoring.auto_row_block("cpu", rows=1550, num_vectors=2, num_items=10_000_000) == 0
  assert scoring.auto_row_block("gpu", rows=1550, num_vectors=2, num_items=12_101) == 0
  assert scoring.auto_row_block("tpu", rows=1550, num_vectors=2, num_items=12_101) == 0


def test_auto_user_block_blocks_users_on_cpu_only():
  assert scoring.auto_user_block("cpu") == scoring.CPU_USER_BLOCK > 0
  assert scoring.auto_user_block("gpu") == 0
