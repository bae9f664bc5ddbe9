"""The FAME and SASRec modules against an explicit NumPy reference, and their invariances.

The parameters are random (not the tiny init), so attention, routers and gate
are far from uniform and a wrong index, transpose or mask shows up.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from conftest import tiny_model_config
from fame_jax import model as model_lib
from fame_jax import scoring

NUM_ITEMS = 23
# Three users, right-padded to L = 7: a full row, a short row and a one-item row.
ITEMS = np.array([[5, 17, 2, 9, 23, 1, 11],
                  [8, 3, 12, 20, 0, 0, 0],
                  [14, 0, 0, 0, 0, 0, 0]], np.int32)
LENGTHS = (ITEMS > 0).sum(axis=1)


def build(**model_overrides) -> model_lib.SequenceRecommender:
  cfg = model_lib.model_config_from(tiny_model_config(**model_overrides), NUM_ITEMS)
  return model_lib.build_model(cfg)


def random_params(model, seed: int = 0, scale: float = 0.4):
  """Random values for every parameter (LayerNorm scales around 1, biases non-zero)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    noise = rng.normal(size=s.shape) * scale
    return jnp.asarray(1.0 + noise if name.endswith("['scale']") else noise, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.partial(jax.jit, static_argnums=0)
def apply_with_intermediates(model, variables, items):
  return model.apply(variables, items, mutable=["intermediates"])


@functools.partial(jax.jit, static_argnums=0)
def all_item_log_probs(model, variables, items):
  """log p(v) for every position and every item 1..V via fame_jax.scoring: [B, L, V]."""
  out = model.apply(variables, items)
  b, length, k, d = out.vectors.shape
  vectors = out.vectors.reshape(b * length, k, d)
  log_weights = out.log_weights.reshape(b * length, k)
  table = model_lib.item_tables(variables["params"], model.cfg)

  def for_item(v):
    return scoring.next_item_log_prob(vectors, log_weights, jnp.full((b * length,), v), table)

  return jax.vmap(for_item, out_axes=-1)(jnp.arange(1, NUM_ITEMS + 1)).reshape(b, length, -1)


FAME_VARIANTS = [
    pytest.param(dict(combine="logit_sum"), id="logit_sum"),
    pytest.param(dict(combine="mixture_of_softmax"), id="mixture_of_softmax"),
    pytest.param(dict(combine="mixture_of_softmax", gate=False, head_ffn_residual="none",
                      activation="relu"), id="mos-no_gate-no_residual-relu"),
    pytest.param(dict(combine="logit_sum", num_layers=1, num_heads=4, num_experts=2),
                 id="logit_sum-fame_layer_only-4_heads"),
]


@pytest.mark.parametrize("overrides", FAME_VARIANTS)
def test_fame_log_probs_match_explicit_loop_over_heads_and_experts(overrides):
  model = build(**overrides)
  cfg = model.cfg
  variables = random_params(model)
  log_p = np.asarray(all_item_log_probs(model, variables, jnp.asarray(ITEMS)))
  _, inter = apply_with_intermediates(model, variables, jnp.asarray(ITEMS))
  router = np.asarray(inter["intermediates"]["fame_layer"]["heads"]["router_weights"][0])
  gate = np.asarray(inter["intermediates"]["gate_weights"][0])
  assert log_p.shape == (3, 7, NUM_ITEMS)
  assert router.shape == (cfg.num_heads, 3, 7, cfg.num_experts)
  assert gate.shape == (3, 7, cfg.num_heads)

  for u, length in enumerate(LENGTHS):
    expected = ref.fame_forward(variables["params"], ITEMS[u], cfg)
    np.testing.assert_allclose(log_p[u, :length], expected["log_p"][:length], atol=2e-4)
    np.testing.assert_allclose(router[:, u, :length], expected["router"][:, :length], atol=2e-5)
    np.testing.assert_allclose(gate[u, :length], expected["gate"][:length], atol=2e-5)
    # The reference is a proper distribution, and not a trivial one.
    np.testing.assert_allclose(np.exp(expected["log_p"]).sum(-1), 1.0, rtol=1e-9)
    assert np.ptp(expected["log_p"][:length], axis=-1).min() > 0.1


def test_sasrec_log_probs_match_reference_and_it_has_no_fame_parameters():
  model = build(name="sasrec")
  variables = random_params(model)
  assert set(variables["params"]) == {"item_embedding", "position_embedding", "input_norm",
                                      "block_0", "block_1"}
  out = jax.jit(model.apply)(variables, jnp.asarray(ITEMS))
  assert out.vectors.shape == (3, 7, 1, 16)
  np.testing.assert_array_equal(out.log_weights, 0.0)
  log_p = np.asarray(all_item_log_probs(model, variables, jnp.asarray(ITEMS)))
  for u, length in enumerate(LENGTHS):
    expected = ref.fame_forward(variables["params"], ITEMS[u], model.cfg)
    np.testing.assert_allclose(log_p[u, :length], expected["log_p"][:length], atol=2e-4)


def test_fame_parameters_are_stacked_over_heads_and_the_last_block_is_replaced():
  """The FAME layer is one head module vmapped over a leading head axis; no W_O."""
  model = build(num_heads=2, num_experts=3)
  params = random_params(model)["params"]
  assert set(params) == {"item_embedding", "position_embedding", "input_norm", "block_0",
                         "fame_layer", "gate", "item_projection"}
  heads = params["fame_layer"]["heads"]
  assert set(heads) == {"key", "value", "query", "router"}  # No output projection.
  assert heads["key"]["kernel"].shape == (2, 16, 8)
  assert heads["value"]["kernel"].shape == (2, 16, 8)
  assert heads["query"]["kernel"].shape == (2, 16, 3, 8)
  assert heads["router"]["kernel"].shape == (2, 3 * 8, 3)
  assert params["fame_layer"]["head_ffn"]["inner"]["kernel"].shape == (8, 4 * 8)  # Shared FFN'.
  assert params["item_projection"].shape == (2, 16, 8)


def test_single_expert_head_is_plain_single_head_attention():
  cfg = model_lib.model_config_from(tiny_model_config(num_experts=1), NUM_ITEMS)
  head = model_lib.ExpertAttentionHead(cfg, deterministic=True)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(3, 7, 16)), jnp.float32)
  mask = model_lib.attention_mask(jnp.asarray(ITEMS))
  shapes = jax.eval_shape(head.init, jax.random.key(0), x, x, mask)
  variables = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.5, p.dtype),
                           shapes)
  out, inter = jax.jit(functools.partial(head.apply, mutable=["intermediates"]))(variables, x, x,
                                                                                 mask)
  p = variables["params"]
  q = x @ p["query"]["kernel"][:, 0] + p["query"]["bias"][0]
  k = x @ p["key"]["kernel"] + p["key"]["bias"]
  v = x @ p["value"]["kernel"] + p["value"]["bias"]
  plain = nn.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None], mask=mask)[:, :, 0]
  for u, length in enumerate(LENGTHS):
    np.testing.assert_allclose(out[u, :length], plain[u, :length], atol=1e-5)
  np.testing.assert_array_equal(inter["intermediates"]["router_weights"][0], 1.0)


@pytest.mark.parametrize("combine", ["logit_sum", "mixture_of_softmax"])
def test_router_and_gate_weights_are_distributions(combine):
  model = build(combine=combine, num_heads=2, num_experts=3)
  variables = random_params(model, seed=3)
  out, inter = apply_with_intermediates(model, variables, jnp.asarray(ITEMS))
  router = np.asarray(inter["intermediates"]["fame_layer"]["heads"]["router_weights"][0])
  gate = np.asarray(inter["intermediates"]["gate_weights"][0])
  for weights, axis_size in ((router, 3), (gate, 2)):
    assert weights.shape[-1] == axis_size
    assert (weights >= 0).all()
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-6)
    assert np.abs(weights - 1.0 / axis_size).max() > 0.05  # Not uniform: the test has teeth.
  if combine == "mixture_of_softmax":  # The gate is the mixture over the K = H user vectors.
    np.testing.assert_allclose(np.exp(out.log_weights), gate, rtol=1e-6)
  else:
    assert out.vectors.shape[2] == 1


@pytest.mark.parametrize("combine", ["logit_sum", "mixture_of_softmax"])
def test_without_gate_heads_get_uniform_weights(combine):
  model = build(combine=combine, gate=False, num_heads=4, num_experts=2)
  variables = random_params(model)
  assert "gate" not in variables["params"]
  out, inter = apply_with_intermediates(model, variables, jnp.asarray(ITEMS))
  np.testing.assert_allclose(inter["intermediates"]["gate_weights"][0], 0.25, rtol=1e-6)
  if combine == "mixture_of_softmax":
    np.testing.assert_allclose(out.log_weights, math.log(0.25), rtol=1e-6)


@pytest.mark.parametrize("name,combine", [("fame", "logit_sum"), ("fame", "mixture_of_softmax"),
                                          ("sasrec", "logit_sum")])
def test_outputs_are_causal(name, combine):
  """Changing the items after position i leaves the outputs at positions <= i unchanged."""
  model = build(name=name, combine=combine)
  variables = random_params(model, seed=5)
  apply = jax.jit(model.apply)
  base_items = jnp.asarray(ITEMS[:1])  # The full-length row.
  base = apply(variables, base_items)
  rng = np.random.default_rng(0)
  length = base_items.shape[1]
  for i in range(length - 1):
    changed = np.asarray(base_items).copy()
    changed[0, i + 1:] = rng.integers(1, NUM_ITEMS + 1, length - i - 1)
    out = apply(variables, jnp.asarray(changed))
    np.testing.assert_allclose(out.vectors[:, :i + 1], base.vectors[:, :i + 1], atol=1e-6)
    np.testing.assert_allclose(out.log_weights[:, :i + 1], base.log_weights[:, :i + 1], atol=1e-6)
    # The change is visible where it is allowed to be.
    assert np.abs(out.vectors[:, i + 1:] - base.vectors[:, i + 1:]).max() > 1e-3


@pytest.mark.parametrize("name,combine", [("fame", "logit_sum"), ("fame", "mixture_of_softmax"),
                                          ("sasrec", "logit_sum")])
def test_valid_positions_ignore_padding(name, combine):
  """Neither extra right padding nor the padding embedding changes any valid position."""
  model = build(name=name, combine=combine)
  variables = random_params(model, seed=7)
  base = jax.jit(model.apply)(variables, jnp.asarray(ITEMS))
  valid = ITEMS > 0

  # 1. Three more padding columns (L = 10 = max_len).
  padded = np.pad(ITEMS, ((0, 0), (0, 3)))
  out = jax.jit(model.apply)(variables, jnp.asarray(padded))
  np.testing.assert_allclose(out.vectors[:, :7][valid], base.vectors[valid], atol=1e-5)
  np.testing.assert_allclose(out.log_weights[:, :7][valid], base.log_weights[valid], atol=1e-5)

  # 2. A different embedding for the padding id 0 changes padding positions only.
  params = variables["params"]
  table = params["item_embedding"]["embedding"]
  new_row = jnp.asarray(np.random.default_rng(1).normal(size=table.shape[1]), table.dtype)
  moved = {**params, "item_embedding": {"embedding": table.at[0].set(new_row)}}
  out = jax.jit(model.apply)({"params": moved}, jnp.asarray(ITEMS))
  np.testing.assert_allclose(out.vectors[valid], base.vectors[valid], atol=1e-5)
  np.testing.assert_allclose(out.log_weights[valid], base.log_weights[valid], atol=1e-5)
  assert np.abs(out.vectors[~valid] - base.vectors[~valid]).max() > 1e-3


def test_gelu_is_exact_and_recomputed_in_the_backward_pass():
  gelu = model_lib.ACTIVATIONS["gelu"]
  x = jnp.linspace(-6.0, 6.0, 1001)
  np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(jax.grad(lambda x: gelu(x).sum())(x),
                             jax.grad(lambda x: jax.nn.gelu(x, approximate=False).sum())(x),
                             rtol=1e-6, atol=1e-7)
  # Its forward pass is a checkpoint: only the input is kept for the backward pass.
  _, residuals = jax.vjp(gelu, x)
  assert [leaf.shape for leaf in jax.tree.leaves(residuals)] == [x.shape]


@pytest.mark.parametrize("name", ["fame", "sasrec"])
def test_attention_product_with_heads_first_changes_no_number(name, monkeypatch):
  """`_weights_times_values` only moves the heads axis: with dropout on (the same masks),
  the loss and its gradients equal those of Flax's own weights-times-values product, up to
  float32 rounding in the backward pass's sums."""
  model = build(name=name, num_layers=3, dropout=0.3, attention_dropout=0.3)
  variables = random_params(model, seed=5)
  rngs = {"dropout": jax.random.key(3)}

  def loss(params):
    out = model.apply({"params": params}, jnp.asarray(ITEMS), deterministic=False, rngs=rngs)
    weights = jnp.arange(out.vectors.size).reshape(out.vectors.shape) % 7
    return jnp.sum(out.vectors * weights)

  value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
  monkeypatch.setattr(model_lib, "_weights_times_values", jnp.einsum)
  flax_value, flax_grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
  np.testing.assert_allclose(value, flax_value, rtol=1e-6)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(flax_grads))
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(flax_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["block_0"])) > 0


def test_sequence_longer_than_max_len_is_refused():
  model = build()
  variables = random_params(model)
  with pytest.raises(ValueError, match="max_len"):
    model.apply(variables, jnp.ones((1, model.cfg.max_len + 1), jnp.int32))


@pytest.mark.parametrize("name,combine", [("fame", "logit_sum"), ("fame", "mixture_of_softmax"),
                                          ("sasrec", "logit_sum")])
def test_packed_row_equals_each_sequence_on_its_own(name, combine):
  """Sequences packed end to end into one row (segments, positions) do not see each other."""
  model = build(name=name, combine=combine)
  variables = random_params(model, seed=9)
  separate = jax.jit(model.apply)(variables, jnp.asarray(ITEMS))
  row, segments, positions, where = [], [], [], []
  # Another order than the batch; user 0's first 4 items only (causality makes that a prefix).
  for u, length in ((2, 1), (0, 4), (1, 4)):
    where.append((u, len(row), length))
    row += list(ITEMS[u, :length])
    segments += [u + 1] * length
    positions += list(range(length))
  pad = model.cfg.max_len - len(row)
  packed_inputs = [jnp.asarray([x + [0] * pad]) for x in (row, segments, positions)]
  packed = jax.jit(model.apply)(variables, packed_inputs[0], segments=packed_inputs[1],
                                positions=packed_inputs[2])
  for u, start, length in where:
    np.testing.assert_allclose(packed.vectors[0, start:start + length],
                               separate.vectors[u, :length], atol=1e-5)
    np.testing.assert_allclose(packed.log_weights[0, start:start + length],
                               separate.log_weights[u, :length], atol=1e-5)


@pytest.mark.parametrize("name,overrides", [
    ("fame", dict(combine="logit_sum")), ("fame", dict(combine="mixture_of_softmax")),
    ("sasrec", {}), ("sasrec", dict(num_layers=1))])
def test_output_at_slots_equals_the_full_output_there(name, overrides):
  """`output_at` (evaluation's last-item-only pass) computes exactly the full pass's vectors."""
  model = build(name=name, **overrides)
  variables = random_params(model, seed=11)
  apply = jax.jit(model.apply)
  # Right-padded rows: every row's last item, an earlier slot, and a row asked for twice.
  rows = jnp.asarray([0, 1, 2, 0, 1])
  columns = jnp.asarray([LENGTHS[0] - 1, LENGTHS[1] - 1, 0, 2, LENGTHS[1] - 1])
  full = apply(variables, jnp.asarray(ITEMS))
  slots = apply(variables, jnp.asarray(ITEMS), output_at=(rows, columns))
  assert slots.vectors.shape == (5, 1) + full.vectors.shape[2:]
  np.testing.assert_allclose(slots.vectors[:, 0], full.vectors[rows, columns], atol=1e-5)
  np.testing.assert_allclose(slots.log_weights[:, 0], full.log_weights[rows, columns], atol=1e-5)
  # Packed: two sequences in one row; the first one's end must not see the second.
  items = jnp.asarray([[4, 9, 1, 7, 7, 2, 0]])
  segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 0]])
  positions = jnp.asarray([[0, 1, 2, 0, 1, 2, 0]])
  full = apply(variables, items, segments=segments, positions=positions)
  rows, columns = jnp.asarray([0, 0]), jnp.asarray([2, 5])
  slots = apply(variables, items, segments=segments, positions=positions,
                output_at=(rows, columns))
  np.testing.assert_allclose(slots.vectors[:, 0], full.vectors[rows, columns], atol=1e-5)
  alone = apply(variables, items[:, :3])
  np.testing.assert_allclose(slots.vectors[0, 0], alone.vectors[0, 2], atol=1e-5)
