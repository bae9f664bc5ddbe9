"""benchmarks/step_breakdown.py: the pieces of a training step, timed side by side."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT, random_sequences, write_dataset_file
from fame_jax import scoring

sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))
import step_breakdown  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_catalogue_parts_cover_the_catalogue_at_multiples_of_16():
  for num_items in (7, 16, 40, 12101):
    bounds = scoring.catalogue_bounds(num_items)
    assert bounds[0] == 0 and bounds[-1] == num_items
    assert all(a < b for a, b in zip(bounds[:-1], bounds[1:]))
    assert all(b % 16 == 0 for b in bounds[:-1])
  assert len(scoring.catalogue_bounds(12101)) - 1 == scoring._CATALOGUE_PARTS  # pylint: disable=protected-access


def test_output_matmuls_do_the_three_matmuls_of_every_row_and_item():
  """Blocks and parts partition rows and items, so the summed products equal
  those of the whole [T, V] logits, computed here in numpy in one piece."""
  rng = np.random.default_rng(0)
  num, k, dim, num_items = 23, 2, 4, 40
  vectors = rng.normal(size=(num, k, dim)).astype(np.float32)
  table = rng.normal(size=(k, num_items, dim)).astype(np.float32)
  expected = 0.0
  for h in range(k):
    logits = vectors[:, h].astype(np.float64) @ table[h].T  # [T, V]
    expected += np.sum(logits @ table[h]) + np.sum(vectors[:, h].T @ logits)
  for row_block in (5, 23, 64):  # Padded last block; one block; a block larger than T.
    got = step_breakdown.output_matmuls(jnp.asarray(vectors), jnp.asarray(table),
                                        row_block=row_block)
    np.testing.assert_allclose(float(got), expected, rtol=1e-4)
  shared = step_breakdown.output_matmuls(jnp.asarray(vectors), jnp.asarray(table[0]), row_block=8)
  expected_shared = sum(np.sum((vectors[:, h] @ table[0].T) @ table[0])
                        + np.sum(vectors[:, h].T @ (vectors[:, h] @ table[0].T)) for h in range(k))
  np.testing.assert_allclose(float(shared), expected_shared, rtol=1e-4)


def test_writes_each_piece_and_the_matmuls_only_bound(tmp_path):
  write_dataset_file(tmp_path, "Beauty", random_sequences(np.random.default_rng(0), 120, 300, 5, 30))
  out = tmp_path / "breakdown.json"
  command = [sys.executable, os.path.join(REPO_ROOT, "benchmarks", "step_breakdown.py"),
             "--dataset", "beauty", "--data_dir", str(tmp_path), "--skip_torch",
             "--repeats", "2", "--loss_row_block", "32", "--out", str(out)]
  done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(out.read_text())
  assert set(result["best_ms"]) == {"step", "loss_grad", "body_grad", "output_grad", "output_fwd",
                                    "logits_fwd", "output_matmuls"}
  assert all(ms > 0 for ms in result["best_ms"].values())
  step, output, matmuls = (result["best_ms"][n] for n in ("step", "output_grad", "output_matmuls"))
  assert result["matmuls_only_output_layer_step_ms"] == pytest.approx(step - output + matmuls)
  assert 0 < result["step_fraction_of_peak"] < 1
  assert "of the peak" in done.stdout
