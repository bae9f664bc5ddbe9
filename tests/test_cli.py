"""The entry points, as a user runs them (subprocesses in the repository root)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def run(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
  # The environment carries XLA_FLAGS (4 CPU devices) and the session's compilation cache.
  return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=timeout, env=dict(os.environ), check=False)


def test_train_then_eval_from_the_command_line(tmp_path):
  workdir = str(tmp_path / "run")
  train = run("train.py", "--config", "configs/synthetic.py", "--workdir", workdir,
              "--config.num_epochs=1", "--config.data.synthetic.num_users=300")
  assert train.returncode == 0, train.stderr[-3000:]
  assert "NDCG@10" in train.stdout
  with open(os.path.join(workdir, "eval_test.json")) as f:
    after_training = json.load(f)
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["num_epochs"] == 1 and saved["data"]["synthetic"]["num_users"] == 300

  for name in ("eval_test.json", "eval_valid.json"):
    os.remove(os.path.join(workdir, name))
  evaluation = run("eval.py", "--workdir", workdir)
  assert evaluation.returncode == 0, evaluation.stderr[-3000:]
  for name in ("eval_test.json", "eval_valid.json"):
    with open(os.path.join(workdir, name)) as f:
      metrics = json.load(f)
    assert {"HR@10", "NDCG@10"} <= set(metrics)
    assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if k != "step")
  with open(os.path.join(workdir, "eval_test.json")) as f:
    assert json.load(f) == pytest.approx(after_training, rel=1e-6)


def test_bad_config_exits_non_zero_naming_the_field(tmp_path):
  result = run("train.py", "--config", "configs/synthetic.py", "--workdir", str(tmp_path / "run"),
               "--config.model.num_heads=3", "--config.data.synthetic.num_users=50", timeout=120)
  assert result.returncode != 0
  assert "model.num_heads" in result.stderr
  assert "Traceback" not in result.stderr  # One line, not a stack trace.


def test_eval_of_a_missing_workdir_fails(tmp_path):
  result = run("eval.py", "--workdir", str(tmp_path / "nothing"), timeout=120)
  assert result.returncode != 0
  assert "config.json" in result.stderr
  assert "Traceback" not in result.stderr
