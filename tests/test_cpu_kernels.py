"""cpu_kernels.fused_nll: the training loss as one CPU kernel, against the XLA loss."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import comparable, random_sequences, small_synthetic_config, tiny_model_config
from fame_jax import cpu_kernels
from fame_jax import data as data_lib
from fame_jax import metric_writers
from fame_jax import model as model_lib
from fame_jax import scoring
from fame_jax import sharding as sharding_lib
from fame_jax import train_lib

SGD = optax.sgd(0.5)  # One object: it is static metadata of the train state.
needs_kernel = pytest.mark.skipif(
    not cpu_kernels.available(),
    reason="the kernel needs an x86 CPU with AVX-512 and C and C++ compilers")


def loss_inputs(num: int, k: int, num_items: int, scale: float, seed: int = 1, width: int = 64):
  """Positions not a multiple of the kernel's 32-row block, every 7th position without a
  target; an item table with padding row 0 and 5 unused rows at the end (as the model's
  table is padded to a multiple of 128 rows)."""
  rng = np.random.default_rng(seed)
  dim = cpu_kernels.VECTOR_SIZE
  vectors = jnp.asarray(scale * rng.normal(size=(num, k, dim)) / np.sqrt(dim), jnp.float32)
  log_weights = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(num, k)), jnp.float32))
  targets = jnp.asarray(rng.integers(1, num_items + 1, num), jnp.int32).at[::7].set(0)
  embedding = jnp.asarray(rng.normal(size=(num_items + 6, width)), jnp.float32)
  projection = jnp.asarray(rng.normal(size=(k, width, dim)) / np.sqrt(width), jnp.float32)
  return vectors, log_weights, targets, embedding, projection


def xla_nll(vectors, log_weights, targets, embedding, projection):
  """The same loss in XLA: `model.item_tables` (Eq. 9), then the whole catalogue at once."""
  num_items = embedding.shape[0] - 6
  tables = jnp.einsum("vd,hdk->hvk", embedding, projection)[:, 1:num_items + 1]
  return scoring.next_item_nll(vectors, log_weights, targets, tables)


def kernel_nll(vectors, log_weights, targets, embedding, projection, groups=1):
  return cpu_kernels.fused_nll(vectors, log_weights, targets, embedding, projection,
                               embedding.shape[0] - 6, groups)


GRADIENTS = ("vectors", "log_weights", "embedding", "projection")


def assert_same_loss_and_gradients(inputs, groups=1):
  """Loss and the gradients of the four differentiable inputs, kernel against XLA; returns
  the kernel's."""
  argnums = (0, 1, 3, 4)
  want, want_grads = jax.jit(jax.value_and_grad(xla_nll, argnums))(*inputs)
  got, got_grads = jax.jit(jax.value_and_grad(kernel_nll, argnums), static_argnums=5)(
      *inputs, groups)
  assert np.isfinite(float(got)) and float(got) == pytest.approx(float(want), rel=1e-6)
  # Float32 rounding of logits of size ~|logit|, amplified by the exps: up to ~2e-6 of the
  # largest gradient with logits hundreds apart.
  for name, g, w in zip(GRADIENTS, got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.abs(w).max()), err_msg=name)
  return got, got_grads


@needs_kernel
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("scale", [0.3, 40.0])  # Logits near 0, and hundreds apart.
# Catalogues that end in a partial 8-item tile, that are whole tiles, and that end
# before the 32 items the stabiliser is guessed from.
@pytest.mark.parametrize("num_items", [203, 64, 5])
def test_the_kernel_equals_the_xla_loss_and_its_gradients(k, scale, num_items):
  inputs = loss_inputs(45, k, num_items, scale, width=32 * k)
  _, grads = assert_same_loss_and_gradients(inputs)
  assert not np.any(np.asarray(grads[0])[::7]), "a position without a target has no gradient"
  padding_rows = np.asarray(grads[2])[[0, *range(num_items + 1, num_items + 6)]]
  assert not np.any(padding_rows), "the table's rows that are not items have no gradient"


@needs_kernel
def test_an_embedding_wider_than_the_heads_together():
  """d = 96 for two 32-dimensional heads: W_f maps d to d' whatever d is."""
  assert_same_loss_and_gradients(loss_inputs(70, 2, 150, 3.0, width=96))


@needs_kernel
def test_rows_whose_best_item_is_far_above_the_first_items_are_scored_exactly():
  """The stabiliser guessed from the first 32 items is too low here (the later items'
  logits lie ~100-300 higher): those blocks are scored again against their best logit."""
  vectors, log_weights, targets, embedding, projection = loss_inputs(70, 2, 300, 40.0, seed=2)
  embedding = embedding.at[1:33].multiply(0.01)
  assert_same_loss_and_gradients((vectors, log_weights, targets, embedding, projection))


@needs_kernel
@pytest.mark.parametrize("k,groups", [(2, 2), (2, 3), (3, 2)])
def test_groups_of_threads_share_the_positions_and_give_the_same_loss(k, groups):
  """G groups of K threads (one a head), each group every G-th block of 32 positions:
  150 positions make 5 blocks, shared unevenly; the same loss and gradients as XLA and
  as one group, up to the order of float32 sums."""
  inputs = loss_inputs(150, k, 203, 3.0, width=32 * k)
  many, grads = assert_same_loss_and_gradients(inputs, groups)
  one, one_grads = jax.jit(jax.value_and_grad(kernel_nll, (0, 1, 3, 4)))(*inputs)
  assert float(many) == pytest.approx(float(one), rel=1e-6)
  for name, g, w in zip(GRADIENTS, grads, one_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * float(jnp.abs(w).max()),
                               err_msg=name)


@needs_kernel
def test_more_groups_than_blocks_of_positions_leave_the_rest_idle():
  """45 positions are 2 blocks; with 4 groups, two groups score nothing but still share
  the tables and the gradients of E and W."""
  assert_same_loss_and_gradients(loss_inputs(45, 2, 100, 3.0), groups=4)


def test_cores_count_a_core_with_two_hardware_threads_once(monkeypatch, tmp_path):
  """CPUs 0 and 4 are one core's two threads, 1 and 5 another's; 2 has no topology."""
  siblings = {0: "0,4", 4: "0,4", 1: "1,5", 5: "1,5", 3: "3"}
  for cpu, listed in siblings.items():
    (tmp_path / f"cpu{cpu}" / "topology").mkdir(parents=True)
    (tmp_path / f"cpu{cpu}" / "topology" / "thread_siblings_list").write_text(listed + "\n")
  for allowed, want in [({0, 4, 1, 5}, 2), ({0, 1}, 2), ({0, 4}, 1), ({0, 4, 1, 5, 3}, 3),
                        ({0, 2}, 2)]:  # CPU 2 unknown: count CPUs.
    monkeypatch.setattr(cpu_kernels.os, "sched_getaffinity", lambda _, a=allowed: a)
    assert cpu_kernels.cores(str(tmp_path)) == want, allowed


def test_the_default_groups_use_the_cores_the_process_may_run_on(monkeypatch):
  for cores, k, want in [(2, 2, 1), (1, 2, 1), (16, 2, 8), (16, 3, 5), (256, 2, 32)]:
    monkeypatch.setattr(cpu_kernels, "cores", lambda cores=cores: cores)
    assert cpu_kernels.default_groups(k) == want, (cores, k)
    assert cpu_kernels.default_groups(k, 12101) == want, (cores, k)  # Beauty: 6 MB a group.


def test_the_default_groups_keep_the_extra_groups_buffers_within_a_gibibyte(monkeypatch):
  """A group's exps and dT: K x V x 64 floats, 512 MiB for a million items and K = 2."""
  monkeypatch.setattr(cpu_kernels, "cores", lambda: 16)
  assert cpu_kernels.default_groups(2, 1_000_000) == 3
  assert cpu_kernels.default_groups(2, 10_000_000) == 1
  assert cpu_kernels.default_groups(1, 1_000_000) == 5


@needs_kernel
def test_more_threads_than_the_kernel_runs_is_a_clear_error():
  inputs = loss_inputs(40, 2, 50, 1.0)
  with pytest.raises(ValueError, match="groups=33 of K=2"):
    kernel_nll(*inputs, groups=33)


@needs_kernel
def test_the_kernel_gives_the_same_numbers_every_time():
  inputs = loss_inputs(300, 2, 1000, 3.0)
  grad = jax.jit(jax.value_and_grad(kernel_nll, argnums=(0, 1, 3, 4)))
  first = jax.device_get(grad(*inputs))
  for _ in range(3):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(grad(*inputs)), first)


def fame32_config(**overrides):
  """A FAME whose heads are 32-dimensional (d = 64, H = 2): the shape the kernel takes."""
  config = tiny_model_config(hidden_size=64, num_heads=2, num_experts=2, ffn_size=64,
                             combine="mixture_of_softmax", dropout=0.3, attention_dropout=0.3)
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope="module")
def dataset():
  return data_lib.Dataset("random", random_sequences(np.random.default_rng(0), 40, 150, 4, 18),
                          150)


@needs_kernel
@pytest.mark.parametrize("groups", [1, 2])
def test_a_train_step_with_the_kernel_equals_the_xla_train_step(dataset, devices, groups,
                                                                 monkeypatch):
  """Three SGD steps with dropout, one device: loss kernel "auto" (the kernel, in one or
  two groups of threads) and "xla" (the row-blocked loss in XLA) from the same state."""
  monkeypatch.setattr(cpu_kernels, "default_groups", lambda *_: groups)
  exps = {kernel: dataclasses.replace(train_lib.Experiment.from_config(
      fame32_config(loss_kernel=kernel, loss_row_block=16), dataset, devices=devices[:1]),
      tx=SGD) for kernel in ("auto", "xla")}
  assert exps["auto"].fused_loss and not exps["xla"].fused_loss
  exps["xla"] = dataclasses.replace(exps["xla"], model=exps["auto"].model)  # Same static model.
  batches = list(exps["auto"].batch_plan().batches(seed=0, epoch=0))[:3]
  initial = jax.device_get(exps["auto"].init_state())
  results = {}
  for kernel, exp in exps.items():
    step, state = exp.jit_train_step(), jax.device_put(initial, exp.state_sharding())
    losses = []
    for batch in batches:
      state, metrics = step(state, sharding_lib.global_batch(
          batch, sharding_lib.batch_sharding(exp.mesh)), jax.random.key(3))
      losses.append(float(metrics["loss_sum"]))
    results[kernel] = jax.device_get(state.params), losses
  np.testing.assert_allclose(results["auto"][1], results["xla"][1], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               results["auto"][0], results["xla"][0])
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), results["auto"][0],
                       initial.params)
  assert max(jax.tree.leaves(moved)) > 1e-2


def test_the_kernel_is_used_only_where_it_applies(dataset, devices):
  def fused(config, devices_=devices[:1]):
    return train_lib.Experiment.from_config(config, dataset, devices=devices_).fused_loss

  assert fused(fame32_config()) == cpu_kernels.available()
  assert not fused(fame32_config(loss_kernel="xla"))
  assert not fused(fame32_config(), devices)  # Several devices: the XLA loss, sharded.
  assert not fused(tiny_model_config())  # Heads of 8 dimensions.
  assert not fused(tiny_model_config(hidden_size=64, name="sasrec"))  # One 64-dim vector.
  bf16 = fame32_config()
  bf16.model.dtype = "bfloat16"
  assert not fused(bf16)
  assert not cpu_kernels.applies(2, 32, jnp.bfloat16) and cpu_kernels.applies(2, 32, jnp.float32)
  with pytest.raises(model_lib.ConfigError, match="config.loss_kernel"):
    fused(fame32_config(loss_kernel="fast"))


def test_a_machine_that_cannot_build_the_kernel_trains_with_xla(monkeypatch, tmp_path):
  monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
  monkeypatch.setenv("FAME_JAX_KERNEL_DIR", str(tmp_path / "kernels"))
  cpu_kernels._library.cache_clear()  # pylint: disable=protected-access
  try:
    assert not cpu_kernels.available()
  finally:
    cpu_kernels._library.cache_clear()  # pylint: disable=protected-access


@needs_kernel
@pytest.mark.slow
def test_a_run_with_the_kernel_reproduces_itself(tmp_path):
  """Two short synthetic runs, FAME with 32-dimensional heads (the kernel's shape) on one
  device: the same numbers in every epoch."""
  config = small_synthetic_config()
  config.model.hidden_size, config.num_epochs = 64, 2
  config.loss_row_block = 32
  exp = train_lib.Experiment.from_config(config, devices=jax.devices()[:1])
  assert exp.fused_loss
  records = []
  for run in ("a", "b"):
    train_lib.train_and_evaluate(config, str(tmp_path / run), dataset=exp.dataset,
                                 devices=jax.devices()[:1])
    records.append(comparable(metric_writers.read_metrics(str(tmp_path / run))))
  assert records[0] == records[1] and len(records[0]) == 2


@needs_kernel
def test_a_target_outside_the_catalogue_is_an_error_not_a_stray_read():
  vectors, log_weights, targets, embedding, projection = loss_inputs(40, 2, 50, 1.0)
  with pytest.raises(Exception, match="target outside the catalogue"):
    jax.block_until_ready(kernel_nll(vectors, log_weights, targets.at[3].set(51), embedding,
                                     projection))
