"""The jitted, sharded train step: device-count invariance, packing invariance, NaN guard."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import NUM_DEVICES
from conftest import random_sequences
from conftest import tiny_model_config
from fame_jax import data as data_lib
from fame_jax import sharding as sharding_lib
from fame_jax import train_lib

NUM_ITEMS = 40


@pytest.fixture(scope="module")
def dataset():
  rng = np.random.default_rng(0)
  return data_lib.Dataset("random", random_sequences(rng, 24, NUM_ITEMS, 4, 18), NUM_ITEMS)


# Dropout on: its masks must not depend on how the batch is split over devices.
STEP_MODEL = dict(dropout=0.3, attention_dropout=0.3, combine="mixture_of_softmax")
SGD = optax.sgd(0.5)  # One object: it is static metadata of the train state.


def experiment(dataset, devices=None, loss_row_block=-1, loss_chunk_size=-1,
               **model_overrides) -> train_lib.Experiment:
  """An Experiment on `devices` (default: all 4), with plain SGD.

  SGD makes the parameter update proportional to the gradient; Adam's first
  steps are ~lr * sign(gradient), which amplifies float noise in gradients
  that are ~0 and would make a device-count comparison meaningless.
  """
  config = tiny_model_config(**model_overrides)
  config.loss_row_block, config.loss_chunk_size = loss_row_block, loss_chunk_size
  exp = train_lib.Experiment.from_config(config, dataset, devices=devices)
  return dataclasses.replace(exp, tx=SGD)


def run_steps(exp: train_lib.Experiment, state, batches, rng):
  step = exp.jit_train_step()
  sharding = sharding_lib.batch_sharding(exp.mesh)
  all_metrics = []
  for batch in batches:
    global_batch = sharding_lib.global_batch(batch, sharding)
    assert len(global_batch["items"].sharding.device_set) == exp.mesh.size
    state, metrics = step(state, global_batch, rng)
    all_metrics.append(jax.device_get(metrics))
  return jax.device_get(state), all_metrics


def test_the_suite_sees_four_devices(devices):
  assert len(devices) == NUM_DEVICES
  assert all(d.platform == "cpu" for d in devices)


def test_four_device_train_steps_equal_one_device_train_steps(dataset, devices):
  """Two steps with dropout on: the batch split over 4 devices vs all of it on one device."""
  exp4 = experiment(dataset, **STEP_MODEL)
  # Same model object: the bound `model.apply` is static metadata of the train state.
  exp1 = dataclasses.replace(experiment(dataset, devices=devices[:1], **STEP_MODEL),
                             model=exp4.model)
  assert exp4.mesh.shape[sharding_lib.DATA_AXIS] == 4
  assert exp1.mesh.shape[sharding_lib.DATA_AXIS] == 1
  batches = list(exp4.batch_plan().batches(seed=0, epoch=0))[:2]
  for key in ("items", "targets", "segments"):
    batches[1][key][-1] = 0  # An empty row, as at the end of an epoch.
  initial = jax.device_get(exp4.init_state())
  # Parameters far from the near-uniform init, so that dropout and gradients matter.
  rng_np = np.random.default_rng(0)
  initial = initial.replace(params=jax.tree_util.tree_map_with_path(
      lambda path, p: (p + rng_np.normal(size=p.shape) * 0.3).astype(p.dtype), initial.params))
  state4 = jax.device_put(initial, exp4.state_sharding())
  state1 = jax.device_put(initial, exp1.state_sharding())
  rng = jax.random.key(5)
  state4, metrics4 = run_steps(exp4, state4, batches, rng)
  state1, metrics1 = run_steps(exp1, state1, batches, rng)

  assert int(state4.step) == int(state1.step) == 2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               state4.params, state1.params)
  for m4, m1, batch in zip(metrics4, metrics1, batches):
    assert m4["num_targets"] == m1["num_targets"] == (batch["targets"] > 0).sum()
    np.testing.assert_allclose(m4["loss_sum"], m1["loss_sum"], rtol=1e-5)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    assert m4["bad_step"] == m1["bad_step"] == train_lib.NO_BAD_STEP
  # The updates themselves agree, and are much larger than the tolerance.
  jax.tree.map(lambda a, b, p: np.testing.assert_allclose(a - p, b - p, rtol=1e-3, atol=1e-6),
               state4.params, state1.params, initial.params)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), state1.params, initial.params)
  assert max(jax.tree.leaves(moved)) > 1e-2
  # Dropout was active: the same step in evaluation mode gives another loss.
  batch = {k: jnp.asarray(v) for k, v in batches[0].items()}
  eval_loss, _ = jax.jit(lambda p: train_lib.next_item_loss(exp1.model, p, batch, None, 0))(
      initial.params)
  assert abs(float(eval_loss) - float(metrics1[0]["loss_sum"])) > 1e-3 * abs(float(eval_loss))


def test_row_blocked_loss_on_four_devices_equals_the_streamed_loss_on_one(dataset, devices):
  """Row blocks of 3 positions (each device's share padded) against 7-item chunks."""
  blocked = experiment(dataset, loss_row_block=3, **STEP_MODEL)
  streamed = dataclasses.replace(
      experiment(dataset, devices=devices[:1], loss_row_block=0, loss_chunk_size=7, **STEP_MODEL),
      model=blocked.model)
  assert (blocked.loss_row_block, streamed.loss_row_block, streamed.loss_chunk_size) == (3, 0, 7)
  batches = list(blocked.batch_plan().batches(seed=0, epoch=0))[:1]
  initial = jax.device_get(blocked.init_state())
  rng = jax.random.key(3)
  state4, (metrics4,) = run_steps(blocked, jax.device_put(initial, blocked.state_sharding()),
                                  batches, rng)
  state1, (metrics1,) = run_steps(streamed, jax.device_put(initial, streamed.state_sharding()),
                                  batches, rng)
  np.testing.assert_allclose(metrics4["loss_sum"], metrics1["loss_sum"], rtol=1e-5)
  np.testing.assert_allclose(metrics4["grad_norm"], metrics1["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b, p: np.testing.assert_allclose(a - p, b - p, rtol=1e-3, atol=1e-6),
               state4.params, state1.params, initial.params)


def test_packed_batch_gives_the_loss_and_gradient_of_padded_windows(dataset):
  exp = experiment(dataset, combine="mixture_of_softmax")
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, s.dtype),
                        exp.abstract_state().params)
  windows = data_lib.training_windows(data_lib.train_sequences(dataset), exp.config.data.max_len)
  everything = np.arange(len(windows.lengths))
  padded = data_lib.make_train_batch(windows, everything, len(everything), (exp.config.data.max_len,))
  rows = data_lib.pack_rows(windows.lengths, everything, exp.config.data.max_len)
  assert len(rows) < len(everything)  # Packing did put several windows in a row.
  packed = data_lib.make_packed_batch(windows, rows, len(rows), exp.config.data.max_len)

  def loss_and_grad(batch):
    fn = lambda p: train_lib.next_item_loss(exp.model, p, batch, None, 0)  # pylint: disable=unnecessary-lambda-assignment
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

  (loss_p, count_p), grad_p = loss_and_grad({k: jnp.asarray(v) for k, v in padded.items()})
  (loss_k, count_k), grad_k = loss_and_grad({k: jnp.asarray(v) for k, v in packed.items()})
  assert count_p == count_k == windows.num_targets
  np.testing.assert_allclose(loss_k, loss_p, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grad_k, grad_p)


def test_non_finite_step_leaves_the_state_unchanged_and_reports_the_step(dataset):
  exp = experiment(dataset, **STEP_MODEL)  # The step compiled above (compilation cache).
  batch = next(exp.batch_plan().batches(seed=0, epoch=0))
  initial = jax.device_get(exp.init_state())
  params = initial.params
  broken = jax.tree.map(np.array, params)
  broken["gate"]["bias"][:] = np.nan
  state = jax.device_put(initial.replace(params=broken), exp.state_sharding())
  new_state, metrics = exp.jit_train_step()(
      state, sharding_lib.global_batch(batch, sharding_lib.batch_sharding(exp.mesh)),
      jax.random.key(0))
  assert int(metrics["bad_step"]) == 0  # The step number of the bad step.
  assert float(metrics["loss_sum"]) == 0.0
  assert int(new_state.step) == 0
  new_params = jax.device_get(new_state.params)
  jax.tree.map(np.testing.assert_array_equal, new_params, broken)


def test_a_multi_step_call_equals_its_steps_one_by_one_and_skips_padding(dataset, devices):
  """`train_steps` on 4 devices: two real batches and an all-zero one (the padding of an
  epoch's last call) give the state of the two single steps; the padding counts nothing."""
  exp = experiment(dataset, **STEP_MODEL)
  plan = exp.batch_plan()
  groups = plan.epoch_groups(seed=0, epoch=0)[:2]
  rng = jax.random.key(3)
  expected_state, expected_metrics = run_steps(exp, exp.init_state(), map(plan.make_batch, groups),
                                               rng)

  stacked = plan.stacked_batch(groups, steps=3)
  assert stacked["items"].shape == (3, plan.rows_per_batch, plan.max_len)
  assert not stacked["targets"][2].any()
  sharding = sharding_lib.stacked_batch_sharding(exp.mesh)
  state, metrics = exp.jit_train_steps()(exp.init_state(), sharding_lib.global_batch(
      stacked, sharding), rng)
  state, metrics = jax.device_get((state, metrics))

  assert int(state.step) == 2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               state.params, expected_state.params)
  for key in ("loss_sum", "num_targets"):
    np.testing.assert_allclose(metrics[key], [m[key] for m in expected_metrics] + [0.0],
                               rtol=1e-6)
  np.testing.assert_array_equal(metrics["bad_step"], [train_lib.NO_BAD_STEP] * 3)


def test_steps_per_call_auto_is_one_on_cpu_and_pads_little_elsewhere():
  assert train_lib.auto_steps_per_call("cpu", 88) == 1
  assert train_lib.auto_steps_per_call("gpu", 88) == 11  # 8 calls, no padding.
  assert train_lib.auto_steps_per_call("tpu", 76) == 11  # 7 calls, one empty step.
  assert train_lib.auto_steps_per_call("gpu", 5) == 5  # A short epoch: one call.
  for steps in range(8, 200):
    k = train_lib.auto_steps_per_call("gpu", steps)
    assert 8 <= k <= 16 and -steps % k == min(-steps % j for j in range(8, 17))
