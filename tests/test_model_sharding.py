"""The item table split over a 'model' mesh axis computes what one device computes.

On a ('data', 'model') = (2, 2) mesh of fake CPU devices the item embedding
table and its Adam moments are sharded by rows, and the chunked catalogue
scoring scans each device's own rows. One train step and one ranking pass must
equal the same computation on a single device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import random_sequences, tiny_model_config
from fame_jax import data as data_lib
from fame_jax import sharding as sharding_lib
from fame_jax import train_lib

NUM_ITEMS = 203  # Not a multiple of the chunk or of the shard count.


def _experiment(devices, model_axis: int, loss_chunk: int, combine: str):
  config = tiny_model_config(combine=combine)
  config.mesh_model_axis = model_axis
  config.loss_chunk_size = loss_chunk
  config.eval_chunk_size = loss_chunk
  config.model.dropout = 0.3  # Dropout on: the per-step RNG must not depend on the layout.
  rng = np.random.default_rng(0)
  dataset = data_lib.Dataset("sharding", random_sequences(rng, 16, NUM_ITEMS, 4, 14), NUM_ITEMS)
  return train_lib.Experiment.from_config(config, dataset, devices=devices)


def _batch(exp):
  plan = exp.batch_plan()
  return plan.make_batch(plan.epoch_groups(seed=0, epoch=0)[0])


@pytest.mark.parametrize("loss_chunk,combine", [(0, "logit_sum"), (48, "mixture_of_softmax")])
def test_model_sharded_train_step_equals_single_device(devices, loss_chunk, combine):
  sharded = _experiment(devices, model_axis=2, loss_chunk=loss_chunk, combine=combine)
  single = _experiment(devices[:1], model_axis=1, loss_chunk=loss_chunk, combine=combine)
  batch = _batch(sharded)  # Rows a multiple of the 2 data shards; fine for one device too.
  rng = jax.random.key(7)

  state = sharded.init_state()
  table = state.params["item_embedding"]["embedding"]
  assert table.sharding.spec == P("model", None)
  assert table.addressable_shards[0].data.shape[0] == table.shape[0] // 2

  results = []
  for exp, s in ((sharded, state), (single, single.init_state())):
    gbatch = sharding_lib.global_batch(batch, sharding_lib.batch_sharding(exp.mesh))
    new_state, metrics = exp.jit_train_step()(s, gbatch, rng)
    results.append((jax.device_get(new_state.params), jax.device_get(metrics)))
  (p_sharded, m_sharded), (p_single, m_single) = results
  np.testing.assert_allclose(m_sharded["loss_sum"], m_single["loss_sum"], rtol=1e-5)
  assert m_sharded["num_targets"] == m_single["num_targets"] > 0
  # Adam's first step is ~lr * sign(gradient): float rounding in a near-zero
  # gradient (summed in another order over the shards) can move an element by a
  # fraction of lr, so parameters agree to 1% of one step (the gradients
  # themselves agree to ~1e-6 relative).
  step_size = exp.config.optim.learning_rate
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=0.01 * step_size),
               p_sharded, p_single)


@pytest.mark.parametrize("chunk", [48])
def test_model_sharded_ranking_equals_single_device(devices, chunk):
  from fame_jax import evaluation  # pylint: disable=g-import-not-at-top
  sharded = _experiment(devices, model_axis=2, loss_chunk=chunk, combine="mixture_of_softmax")
  single = _experiment(devices[:1], model_axis=1, loss_chunk=chunk, combine="mixture_of_softmax")
  params = jax.device_get(single.init_state().params)
  valid = single.eval_data("valid")
  ranks = []
  for exp in (sharded, single):
    placed = jax.device_put(params, sharding_lib.state_shardings(params, exp.mesh))
    _, r = evaluation.evaluate(exp.make_eval_fn(), placed, valid, exp.config.eval_batch_size,
                               exp.buckets, exp.mesh)
    ranks.append(r)
  np.testing.assert_array_equal(ranks[0], ranks[1])
  assert (ranks[0] >= 0).all() and (ranks[0] < NUM_ITEMS).all()
