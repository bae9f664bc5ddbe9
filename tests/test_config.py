"""Impossible configurations are refused with an error that names the field."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import load_config
from conftest import tiny_model_config
from fame_jax import data as data_lib
from fame_jax import model as model_lib
from fame_jax import sharding as sharding_lib
from fame_jax import train_lib

CONFIG_NAMES = ["default", "synthetic", "beauty", "sports", "toys", "yelp"]


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_shipped_configs_are_valid(name):
  config = load_config(name)
  cfg = model_lib.model_config_from(config, num_items=1000)
  assert cfg.hidden_size % cfg.num_heads == 0
  assert cfg.num_vectors == cfg.num_heads  # mixture_of_softmax by default (docs/open_points.md).
  if name not in ("default", "synthetic"):
    assert config.data.name.lower()[:4] == name[:4]


BAD_MODEL_FIELDS = [
    pytest.param("num_heads", 3, "model.num_heads", id="heads_do_not_divide_hidden"),
    pytest.param("num_experts", 0, "model.num_experts", id="no_experts"),
    pytest.param("dropout", 1.0, "model.dropout", id="dropout_one"),
    pytest.param("attention_dropout", -0.1, "model.attention_dropout", id="negative_dropout"),
    pytest.param("combine", "sum_of_logits", "model.combine", id="unknown_combine"),
    pytest.param("name", "bert4rec", "model.name", id="unknown_model"),
    pytest.param("activation", "swish", "model.activation", id="unknown_activation"),
    pytest.param("head_ffn_residual", "input", "model.head_ffn_residual", id="unknown_residual"),
    pytest.param("dtype", "float16", "model.dtype", id="unknown_dtype"),
]


@pytest.mark.parametrize("field,value,name", BAD_MODEL_FIELDS)
def test_model_config_errors_name_the_field(field, value, name):
  config = tiny_model_config(**{field: value})  # hidden_size 16.
  with pytest.raises(model_lib.ConfigError) as e:
    model_lib.model_config_from(config, num_items=50)
  assert name in str(e.value)
  assert repr(value) in str(e.value) or str(value) in str(e.value)


def test_config_error_is_a_value_error():
  assert issubclass(model_lib.ConfigError, ValueError)


def test_valid_edge_values_are_accepted():
  config = tiny_model_config(num_heads=16, num_experts=1, dropout=0.0)  # d' = 1.
  cfg = model_lib.model_config_from(config, num_items=2)
  assert cfg.head_dim == 1 and cfg.head_ffn_size == 4


def test_mixture_of_softmax_has_one_user_vector_per_head():
  cfg = model_lib.model_config_from(
      tiny_model_config(combine="mixture_of_softmax", num_heads=4), num_items=50)
  assert cfg.num_vectors == 4
  sasrec = model_lib.model_config_from(
      tiny_model_config(name="sasrec", combine="mixture_of_softmax", num_heads=4), num_items=50)
  assert sasrec.num_vectors == 1


def test_batch_size_must_split_over_the_devices(devices):
  mesh = sharding_lib.make_mesh(1, devices)
  sharding_lib.check_batch_size(8, mesh, "batch_size")
  with pytest.raises(ValueError, match="batch_size"):
    sharding_lib.check_batch_size(6, mesh, "batch_size")
  with pytest.raises(ValueError, match="mesh_model_axis"):
    sharding_lib.make_mesh(3, devices)


BAD_TRAINING_FIELDS = [
    pytest.param("batch_size", 0, id="batch_size"),
    pytest.param("eval_every_epochs", 0, id="eval_every_epochs"),
    pytest.param("early_stop_patience", 0, id="early_stop_patience"),
    pytest.param("optim.learning_rate", 0.0, id="learning_rate"),
    pytest.param("loss_chunk_size", -2, id="loss_chunk_size"),
    pytest.param("loss_row_block", -2, id="loss_row_block"),
    pytest.param("eval_user_block", -2, id="eval_user_block"),
    pytest.param("steps_per_call", 0, id="steps_per_call"),
]


@pytest.mark.parametrize("field,value", BAD_TRAINING_FIELDS)
def test_training_config_errors_name_the_field(field, value):
  config = tiny_model_config()
  if "." in field:
    group, name = field.split(".")
    setattr(config[group], name, value)
  else:
    setattr(config, field, value)
  dataset = data_lib.Dataset("t", [np.arange(1, 6, dtype=np.int32)] * 4, 5)
  with pytest.raises(model_lib.ConfigError, match=field.replace(".", r"\.")):
    train_lib.Experiment.from_config(config, dataset)


def test_several_steps_per_call_need_packed_batches():
  config = tiny_model_config()
  config.data.packing, config.steps_per_call = False, 3
  dataset = data_lib.Dataset("t", [np.arange(1, 6, dtype=np.int32)] * 4, 5)
  with pytest.raises(model_lib.ConfigError, match=r"config\.steps_per_call: .*data\.packing"):
    train_lib.Experiment.from_config(config, dataset)
  config.steps_per_call = -1  # Auto: one step per call without packing, on any backend.
  assert train_lib.Experiment.from_config(config, dataset).steps_per_call == 1


def test_experiment_refuses_unknown_early_stop_metric(tiny_config):
  config = tiny_config
  config.early_stop_metric = "NDCG@15"
  dataset = data_lib.Dataset("t", [np.arange(1, 6, dtype=np.int32)] * 4, 5)
  with pytest.raises(model_lib.ConfigError, match="early_stop_metric"):
    train_lib.Experiment.from_config(config, dataset)


def test_default_data_dir_follows_fame_data_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("FAME_DATA_DIR", str(tmp_path))
  assert load_config("beauty").data.dir == str(tmp_path)
  monkeypatch.delenv("FAME_DATA_DIR")
  assert load_config("beauty").data.dir == os.path.join(".", "data")
