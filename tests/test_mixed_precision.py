"""bfloat16 activations and matmuls (float32 parameters and loss) stay close to float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_sequences, tiny_model_config
from fame_jax import data as data_lib
from fame_jax import model as model_lib
from fame_jax import train_lib

NUM_ITEMS = 150


@pytest.mark.parametrize("chunk_size,row_block", [(0, 0), (32, 0), (0, 16)],
                         ids=["whole_catalogue", "streamed", "row_blocks"])
@pytest.mark.parametrize("name,combine", [("fame", "logit_sum"), ("fame", "mixture_of_softmax"),
                                          ("sasrec", "logit_sum")])
def test_bfloat16_loss_and_gradients_match_float32(devices, name, combine, chunk_size, row_block):
  rng = np.random.default_rng(1)
  dataset = data_lib.Dataset("mp", random_sequences(rng, 12, NUM_ITEMS, 5, 12), NUM_ITEMS)
  losses, grads = {}, {}
  params = None
  for dtype in ("float32", "bfloat16"):
    config = tiny_model_config(name=name, combine=combine, dtype=dtype)
    exp = train_lib.Experiment.from_config(config, dataset, devices=devices[:1])
    if params is None:
      params = exp.init_state().params
    plan = exp.batch_plan()
    batch = plan.make_batch(plan.epoch_groups(0, 0)[0])

    def mean_loss(p):
      total, count = train_lib.next_item_loss(exp.model, p, batch, None, chunk_size,
                                              row_block=row_block)
      return total / count

    losses[dtype], grads[dtype] = jax.jit(jax.value_and_grad(mean_loss))(params)
    if dtype == "bfloat16":
      assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # Params stay f32.
  assert np.isfinite(losses["bfloat16"])
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)
  g32 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads["float32"])])
  g16 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads["bfloat16"])])
  cosine = g32 @ g16 / (np.linalg.norm(g32) * np.linalg.norm(g16))
  assert cosine > 0.98, cosine
