"""Shared test setup for fame-jax.

Everything here runs before any test module imports jax:

* four virtual CPU devices (`--xla_force_host_platform_device_count=4`), so
  the sharded code paths run on a laptop;
* `JAX_PLATFORMS=cpu`, so an accelerator on the machine does not change results;
* a per-session persistent compilation cache (inherited by the CLI
  subprocesses): several tests compile the same train step, and XLA compiles
  are most of this suite's run time on a small CPU.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import tempfile

NUM_DEVICES = 4

_flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={NUM_DEVICES}".strip()
os.environ["JAX_PLATFORMS"] = "cpu"

_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fame_jax_tests_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)  # fame_jax/ and configs/ are imported from the checkout.

# Only now may jax be imported.
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def load_config(name: str) -> ml_collections.ConfigDict:
  """`configs/<name>.py`'s `get_config()`, loaded from its file like `--config` does."""
  path = os.path.join(REPO_ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"_fame_test_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_model_config(**model_overrides) -> ml_collections.ConfigDict:
  """configs/default.py shrunk to a model that compiles in about a second.

  Dropout is off so that deterministic comparisons are exact; tests that need
  dropout switch it back on.
  """
  config = load_config("default")
  config.data.max_len = 10
  config.data.length_buckets = (0,)
  config.batch_size = 8
  config.eval_batch_size = 8
  m = config.model
  m.hidden_size = 16
  m.num_layers = 2
  m.num_heads = 2
  m.num_experts = 3
  m.ffn_size = 32
  m.head_ffn_size = 0
  m.dropout = 0.0
  m.attention_dropout = 0.0
  for key, value in model_overrides.items():
    setattr(m, key, value)
  return config


@pytest.fixture
def tiny_config() -> ml_collections.ConfigDict:
  return tiny_model_config()


def small_synthetic_config() -> ml_collections.ConfigDict:
  """configs/synthetic.py with fewer users and items and a smaller model: a short CPU run.

  It still learns the planted structure within a few epochs.
  """
  config = load_config("synthetic")
  config.data.synthetic.num_users = 400
  config.data.synthetic.num_items = 120
  config.data.length_buckets = (0,)  # Evaluation batches: one static shape, one compile.
  config.model.hidden_size = 32
  config.model.ffn_size = 64
  config.model.num_experts = 2
  config.batch_size = 64
  config.eval_batch_size = 128
  config.num_epochs = 6
  config.optim.learning_rate = 3e-3
  config.early_stop_patience = 100  # Never stops early: a run lasts exactly num_epochs.
  config.checkpoint_every_secs = 0.0  # A checkpoint at every epoch's end, whatever the clock.
  return config


def comparable(records: list[dict]) -> list[dict]:
  """metrics.jsonl records without their wall-clock fields (`*_seconds`, `*_per_second`)."""
  clock = ("_seconds", "_per_second")
  return [{k: v for k, v in r.items() if not k.endswith(clock)} for r in records]


def write_dataset_file(directory: str, name: str, content) -> str:
  """Writes `<directory>/<name>.txt`.

  `content` is either the raw text or a list of item sequences, written as
  `user item item ...` lines with users numbered from 1.
  """
  path = os.path.join(str(directory), f"{name}.txt")
  if not isinstance(content, str):
    content = "".join(f"{u} {' '.join(str(int(i)) for i in seq)}\n"
                      for u, seq in enumerate(content, start=1))
  with open(path, "w") as f:
    f.write(content)
  return path


@pytest.fixture
def write_dataset(tmp_path):
  """`write_dataset(name, content) -> path` in this test's tmp_path."""
  return lambda name, content: write_dataset_file(tmp_path, name, content)


def random_sequences(rng: np.random.Generator, num_users: int, num_items: int, min_len: int,
                     max_len: int) -> list[np.ndarray]:
  return [rng.integers(1, num_items + 1, rng.integers(min_len, max_len + 1)).astype(np.int32)
          for _ in range(num_users)]


@pytest.fixture(scope="session")
def devices():
  devs = jax.devices()
  assert len(devs) == NUM_DEVICES, (
      f"expected {NUM_DEVICES} CPU devices from XLA_FLAGS; got {devs}. Was jax imported before "
      "tests/conftest.py could set XLA_FLAGS?")
  return devs
