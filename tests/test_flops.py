"""fame_jax.flops: the FLOP count behind `matmul_peak_fraction` and the epochs' GFLOP/s.

The reference is the model itself: the FLOPs of every `dot_general` in the
jaxpr of its forward pass, and of its training loss and gradient, on batches
whose rows are full, so that every (query, key) pair the attention computes
is one of real tokens (S = L^2 a row) and every position has a target.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from conftest import random_sequences, tiny_model_config
from fame_jax import data as data_lib
from fame_jax import flops as flops_lib
from fame_jax import model as model_lib
from fame_jax import train_lib

NUM_ITEMS = 40
VARIANTS = {"fame_mixture_of_softmax": dict(name="fame", combine="mixture_of_softmax"),
            "fame_logit_sum": dict(name="fame", combine="logit_sum"),
            "sasrec": dict(name="sasrec")}


def dot_general_flops(jaxpr: jax_core.Jaxpr) -> int:
  """2 x output size x contracted size of every dot_general, nested jaxprs included.

  A scan's body counts `length` times; a cond its cheapest branch (the scoring
  code's conds hold fallbacks for rows whose exponentials would overflow, which
  do not run in a normal step); a while loop holding a matmul raises, since how
  often it runs is not in the jaxpr.
  """
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (contracting, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs.shape[i] for i in contracting)
    elif name == "cond":
      total += min(dot_general_flops(branch.jaxpr) for branch in eqn.params["branches"])
    else:
      for sub in jax_core.jaxprs_in_params(eqn.params):
        flops = dot_general_flops(sub)
        if flops and name == "while":
          raise ValueError("a matmul in a while loop")
        total += flops * (eqn.params["length"] if name == "scan" else 1)
  return total


def jaxpr_flops(fn, *args) -> int:
  return dot_general_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def full_batch(cfg: model_lib.ModelConfig, rows: int) -> dict[str, jax.Array]:
  """Rows of max_len real items, every position with a target: no padding anywhere."""
  rng = np.random.default_rng(0)
  shape = (rows, cfg.max_len)
  return {"items": jnp.asarray(rng.integers(1, cfg.num_items + 1, shape), jnp.int32),
          "targets": jnp.asarray(rng.integers(1, cfg.num_items + 1, shape), jnp.int32)}


def model_and_params(variant: str):
  config = tiny_model_config(**VARIANTS[variant])
  cfg = model_lib.model_config_from(config, NUM_ITEMS)
  model = model_lib.build_model(cfg)
  params = model.init(jax.random.key(0), jnp.ones((1, cfg.max_len), jnp.int32))["params"]
  return cfg, model, params


def full_rows_stats(cfg: model_lib.ModelConfig, rows: int) -> flops_lib.TokenStats:
  tokens = rows * cfg.max_len
  return flops_lib.TokenStats(steps=1, tokens_in=tokens, tokens_target=tokens,
                              attended_pairs=rows * cfg.max_len ** 2)


def padding_table_rows_flops(cfg: model_lib.ModelConfig) -> int:
  """The per-head tables E W_f^(h) are projected for the whole table, whose rows past the
  V items (padding id 0, and up to a multiple of 128) the count leaves out."""
  if not cfg.per_head_tables:
    return 0
  return 2 * (cfg.table_rows - cfg.num_items) * cfg.hidden_size ** 2


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_forward_count_is_the_models_matmuls(variant):
  cfg, model, params = model_and_params(variant)
  batch = full_batch(cfg, rows=3)

  def network(params):  # User vectors and what they score against: all but the output layer.
    return model.apply({"params": params}, batch["items"]), model_lib.item_tables(params, cfg)

  counted = flops_lib.forward_flops(cfg, full_rows_stats(cfg, rows=3))
  assert counted["output_layer"] == 2 * 3 * cfg.max_len * cfg.hidden_size * NUM_ITEMS
  network_flops = sum(counted.values()) - counted["output_layer"]
  assert jaxpr_flops(network, params) == network_flops + padding_table_rows_flops(cfg)


@pytest.mark.parametrize("row_block", [0, 8])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_training_step_is_three_forward_passes(variant, row_block):
  """Loss and gradients: 3x the counted forward FLOPs, output layer included, with the
  loss over the whole catalogue at once (GPU default) or in blocks of rows that take
  their gradients in the forward pass (CPU default). Either also scores each position's
  target apart, 2 D K FLOPs (the count has them in the logits). The item-chunked loss,
  which recomputes its logits in the backward pass, does more than the count."""
  cfg, model, params = model_and_params(variant)
  batch = full_batch(cfg, rows=4)
  loss_fn = functools.partial(train_lib.next_item_loss, model, batch=batch, rng=None,
                              chunk_size=0, row_block=row_block)
  executed = jaxpr_flops(jax.grad(lambda p: loss_fn(params=p)[0]), params)

  counted = flops_lib.train_flops(cfg, full_rows_stats(cfg, rows=4))
  target_scores = 3 * 2 * 4 * cfg.max_len * cfg.vector_size * cfg.num_vectors
  assert executed == counted["total"] + 3 * padding_table_rows_flops(cfg) + target_scores


def test_an_epochs_tokens_do_not_depend_on_packing():
  sequences = random_sequences(np.random.default_rng(1), 60, NUM_ITEMS, 2, 30)
  config = tiny_model_config()
  config.data.max_len = 12
  windows = data_lib.training_windows(sequences, config.data.max_len)
  stats = {}
  for packing in (False, True):
    config.data.packing = packing
    config.data.length_buckets = (4, 8, 12)
    plan = data_lib.BatchPlan.create(windows, config)
    batches = list(plan.batches(seed=0, epoch=0))
    stats[packing] = flops_lib.TokenStats.of_batches(batches)
    assert stats[packing] == flops_lib.TokenStats.of_windows(windows, len(batches))
    # Brute force: (query, key) pairs of real tokens of one sequence, key not after query.
    pairs = 0
    for b in batches:
      segments = b.get("segments", (b["items"] > 0).astype(np.int32))
      positions = b.get("positions", np.broadcast_to(np.arange(b["items"].shape[1]),
                                                     b["items"].shape))
      same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, :, None] > 0)
      pairs += int((same & (positions[:, None, :] <= positions[:, :, None])).sum())
    assert stats[packing].attended_pairs == pairs
  assert stats[False].tokens_in == int(windows.lengths.sum())
  assert stats[False].tokens_target == windows.num_targets
