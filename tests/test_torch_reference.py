"""The PyTorch reference of benchmarks/ computes what fame-jax computes, on the same parameters.

Skipped when torch is not installed (it is only the optional `bench` extra).
"""

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from configs import synthetic  # pylint: disable=wrong-import-position
from fame_jax import data as data_lib  # pylint: disable=wrong-import-position
from fame_jax import evaluation  # pylint: disable=wrong-import-position
from fame_jax import train_lib  # pylint: disable=wrong-import-position

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position

RTOL = 1e-4


def perturbed(params, seed=0, scale=0.3):
  """Init params moved far from init (std 0.02 gives logits ~0 and a trivially equal loss)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                      for x, k in zip(leaves, keys)])


def experiment(**model_overrides):
  config = synthetic.get_config()
  config.data.synthetic.num_users = 200
  config.data.synthetic.num_items = 300
  for k, v in model_overrides.items():
    setattr(config.model, k, v)
  return train_lib.Experiment.from_config(config)


def train_batch(exp, packed=False):
  """Padded: short rows, long rows and two all-padding rows. Packed: fame-jax's packed rows."""
  windows = data_lib.training_windows(data_lib.train_sequences(exp.dataset), exp.model.cfg.max_len)
  index = np.argsort(windows.lengths, kind="stable")[::7][:30]
  if not packed:
    return data_lib.make_train_batch(windows, index, 32, exp.buckets)
  rows = data_lib.pack_rows(windows.lengths, index, exp.model.cfg.max_len)
  batch = data_lib.make_packed_batch(windows, rows, len(rows) + 1, exp.model.cfg.max_len)
  assert (batch["segments"].max(axis=1) > 1).any()  # Some rows hold several sequences.
  return batch


def torch_batch(batch):
  return {k: torch.from_numpy(v).long() for k, v in batch.items()}


VARIANTS = {
    "fame_logit_sum": {"combine": "logit_sum"},
    "fame_mixture_of_softmax": {"combine": "mixture_of_softmax"},
    "fame_no_gate_no_residual": {"gate": False, "head_ffn_residual": "none", "num_heads": 4},
    "fame_one_expert": {"num_experts": 1},
    "sasrec": {"name": "sasrec"},
}


CASES = ([(v, False, False) for v in sorted(VARIANTS)]  # (variant, literal Eq. 9, packed batch)
         + [("fame_logit_sum", True, False), ("fame_mixture_of_softmax", True, False),
            ("fame_logit_sum", False, True), ("fame_mixture_of_softmax", False, True),
            ("sasrec", False, True)])


@pytest.mark.parametrize("variant,literal,packed", CASES)
def test_same_loss_and_gradients(variant, literal, packed):
  torch.manual_seed(0)
  exp = experiment(**VARIANTS[variant])
  params = perturbed(exp.init_state().params)
  batch = train_batch(exp, packed)
  assert (batch["targets"] == 0).any() and (batch["targets"] > 0).any()

  def jax_loss(p):
    jax_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    loss_sum, count = train_lib.next_item_loss(exp.model, p, jax_batch, None, 0)
    return loss_sum / count

  loss_j, grads_j = jax.value_and_grad(jax_loss)(params)

  module = torch_reference.SequenceRecommender(exp.model.cfg, literal_item_projection=literal)
  torch_reference.load_flax_params(module, params)
  module.eval()  # Deterministic: no dropout.
  loss_t = module.loss(**torch_batch(batch))
  loss_t.backward()

  assert float(loss_j) > 1.0  # Far from a trivial loss.
  np.testing.assert_allclose(loss_t.item(), float(loss_j), rtol=RTOL)
  # Gradients of the catalogue-sized table and of the last layer agree too (relative norm error;
  # elementwise, float32 summation order moves a few near-zero entries by ~1e-5).
  rows = exp.model.cfg.num_items + 1  # fame-jax may pad its table with unused rows.
  pairs = [(module.item_embedding.weight.grad, grads_j["item_embedding"]["embedding"][:rows])]
  if exp.model.cfg.name == "fame":
    pairs.append((module.fame_layer.router.grad,
                  grads_j["fame_layer"]["heads"]["router"]["kernel"]))
  for got, want in pairs:
    want = np.asarray(want)
    err = np.linalg.norm(got.numpy() - want)
    assert err <= 1e-4 * np.linalg.norm(want) + 1e-9, (err, np.linalg.norm(want))


@pytest.mark.parametrize("variant", ["fame_logit_sum", "fame_mixture_of_softmax", "sasrec"])
def test_same_ranks(variant):
  exp = experiment(**VARIANTS[variant])
  params = perturbed(exp.init_state().params, seed=1)
  data = exp.eval_data("valid")
  module = torch_reference.SequenceRecommender(exp.model.cfg)
  torch_reference.load_flax_params(module, params)
  module.eval()
  _, ranks_j = evaluation.evaluate(exp.make_eval_fn(), params, data, 64, exp.buckets, exp.mesh)
  ranks_t = np.empty_like(ranks_j)
  with torch.inference_mode():
    for batch, index in data_lib.eval_batches(data, 64, exp.buckets):
      t = {k: torch.from_numpy(v).long() for k, v in batch.items()}
      ranks = module.ranks(t["items"], t["lengths"], t["targets"], t["exclude"])
      ranks_t[index] = ranks[:len(index)].numpy()
  # Float summation order may flip a near-tie; nothing more.
  assert np.mean(ranks_t == ranks_j) > 0.97
  assert np.max(np.abs(ranks_t - ranks_j)) <= 2


def test_flax_tree_fully_mapped():
  """Every Flax parameter lands in the torch module, and every torch tensor is covered."""
  exp = experiment()
  params = exp.init_state().params
  module = torch_reference.SequenceRecommender(exp.model.cfg)
  sd = torch_reference.state_dict_from_flax(params, exp.model.cfg)
  assert set(sd) == set(module.state_dict())
  table = params["item_embedding"]["embedding"]
  unused_rows = table.shape[0] - (exp.model.cfg.num_items + 1)  # fame-jax's padding rows, if any.
  assert sum(v.numel() for v in sd.values()) == (sum(x.size for x in jax.tree.leaves(params))
                                                 - unused_rows * table.shape[1])
