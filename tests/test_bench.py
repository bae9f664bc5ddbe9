"""benchmarks/bench.py end to end, fame-jax half, on a small generated "Beauty" file.

The JSON is an interface (issue: speed benchmark): its documented keys must be
there, with numbers where the runs ran and null where they were skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from conftest import REPO_ROOT, random_sequences, write_dataset_file

DOCUMENTED_KEYS = ("fame_epoch_s", "sasrec_epoch_s", "torch_eager_epoch_s",
                   "torch_compile_epoch_s", "speedup_vs_torch_eager", "eval_speedup_vs_torch",
                   "matmul_peak_fraction", "peak_rss_mb")


def test_bench_writes_the_documented_json_with_evaluation_batches_timed_apart(tmp_path):
  write_dataset_file(tmp_path, "Beauty", random_sequences(np.random.default_rng(0), 150, 80, 5, 40))
  out = tmp_path / "bench.json"
  command = [sys.executable, os.path.join(REPO_ROOT, "benchmarks", "bench.py"),
             "--dataset", "beauty", "--data_dir", str(tmp_path), "--skip_torch",
             "--skip_same_batches", "--max_steps", "2", "--eval_users", "64",
             "--pipelined_epochs", "1", "--eval_repeats", "2", "--matmul_sizes", "256",
             "--matmul_repeats", "1", "--keep_compile_caches", "--out", str(out)]
  done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads(out.read_text())

  for key in DOCUMENTED_KEYS:
    assert key in results, key
  assert results["fame_epoch_s"] > 0 and results["sasrec_epoch_s"] > 0
  assert 0 < results["matmul_peak_fraction"] < 1
  assert results["peak_rss_mb"] > 0
  assert results["torch_eager_epoch_s"] is None and results["eval_speedup_vs_torch"] is None

  fame = results["runs"]["fame"]
  assert len(fame["eval_passes_s"]) == 2
  # The batches are built once, before the passes, and timed apart from them.
  assert results["fame_eval_batches_s"] > 0
  assert results["fame_eval_with_batches_s"] == (results["fame_eval_s"]
                                                 + results["fame_eval_batches_s"])
  assert results["eval_users_timed"] == 64 and results["eval_users"] == 150
  assert 0 <= fame["valid_metrics"]["HR@10"] <= 1
