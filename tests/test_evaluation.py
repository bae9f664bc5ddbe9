"""Full-ranking evaluation of a model equals a brute-force NumPy ranking, user by user.

Covers the whole path: last `max_len` history items, length buckets, padded
or packed batches split over 4 devices, the ranks put back in user order, history
exclusion over the *whole* history, and the metrics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from conftest import random_sequences
from conftest import tiny_model_config
from fame_jax import data as data_lib
from fame_jax import evaluation
from fame_jax import scoring
from fame_jax import train_lib

NUM_ITEMS = 29


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("combine,chunk_size", [("logit_sum", 0), ("mixture_of_softmax", 7)])
def test_evaluate_equals_brute_force_ranking(combine, chunk_size, packing, devices):
  rng = np.random.default_rng(0)
  # 13 users (not a multiple of the batch), items repeat, some histories longer than max_len.
  sequences = random_sequences(rng, 13, NUM_ITEMS, 3, 25)
  dataset = data_lib.Dataset("random", sequences, NUM_ITEMS)
  config = tiny_model_config(combine=combine)
  config.eval_chunk_size = chunk_size
  config.eval_batch_size = 8
  config.data.length_buckets = (4, 0)
  exp = train_lib.Experiment.from_config(config, dataset)
  assert exp.mesh.size == len(devices)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.5, s.dtype),
                        exp.abstract_state().params)
  data = exp.eval_data("test")
  metrics, ranks = evaluation.evaluate(exp.make_eval_fn(), params, data, config.eval_batch_size,
                                       exp.buckets, exp.mesh, packing)

  split = data_lib.eval_split(dataset, "test")
  expected = []
  for history, target in zip(split.histories, split.targets):
    recent = history[-config.data.max_len:]
    log_p = ref.fame_forward(params, recent, exp.model.cfg)["log_p"][-1]
    expected.append(ref.brute_force_rank(log_p, int(target), history))
  np.testing.assert_array_equal(ranks, expected)
  assert metrics == pytest.approx(ref.brute_force_metrics(expected), rel=1e-12)
  assert len(set(expected)) > 3  # Not a degenerate ranking.
  # Without history exclusion, only the candidate set changes.
  no_exclusion = data_lib.eval_data(split, config.data.max_len, exclude_history=False)
  _, ranks_all = evaluation.evaluate(exp.make_eval_fn(), params, no_exclusion,
                                     config.eval_batch_size, exp.buckets, exp.mesh, packing)
  assert (ranks_all >= ranks).all() and (ranks_all > ranks).any()
  assert scoring.metrics_from_ranks(ranks_all) == pytest.approx(
      ref.brute_force_metrics(list(ranks_all)), rel=1e-12)
