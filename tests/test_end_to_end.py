"""Short synthetic runs through `train_and_evaluate`: learning, checkpoints, resume, evaluation.

One reference run (module fixture) is trained once; the other tests compare
against it. All runs share the compiled programs through the compilation cache.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import sys

import numpy as np
import pytest

import numpy_reference as ref
from conftest import comparable, small_synthetic_config
from fame_jax import checkpointing
from fame_jax import data as data_lib
from fame_jax import eval_lib
from fame_jax import evaluation
from fame_jax import flops as flops_lib
from fame_jax import metric_writers
from fame_jax import train_lib

pytestmark = pytest.mark.slow

METRIC_NAMES = {"HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR"}


@pytest.fixture(scope="module")
def config():
  return small_synthetic_config()


@pytest.fixture(scope="module")
def reference_run(config, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference_run"))
  results = train_lib.train_and_evaluate(config, workdir)
  return workdir, results


def popularity_ranks(dataset: data_lib.Dataset, split: str) -> np.ndarray:
  """Ranks of the held-out items under item popularity in the training prefixes."""
  counts = np.zeros(dataset.num_items + 1)
  for s in data_lib.train_sequences(dataset):
    np.add.at(counts, s, 1)
  evals = data_lib.eval_split(dataset, split)
  return np.array([ref.brute_force_rank(counts[1:], t, h) for h, t in
                   zip(evals.histories, evals.targets)])


def test_training_learns_beyond_popularity(config, reference_run):
  _, results = reference_run
  dataset = data_lib.load_dataset(config)
  popularity = ref.brute_force_metrics(list(popularity_ranks(dataset, "valid")))
  model = results["valid"]
  assert model["NDCG@10"] > 2 * popularity["NDCG@10"] + 0.03, (model, popularity)
  assert model["HR@10"] > popularity["HR@10"]
  assert results["test"]["NDCG@10"] > 2 * ref.brute_force_metrics(
      list(popularity_ranks(dataset, "test")))["NDCG@10"]


def test_metrics_file_has_one_line_per_epoch_and_the_loss_falls(config, reference_run):
  workdir, _ = reference_run
  records = metric_writers.read_metrics(workdir)
  assert [r["epoch"] for r in records] == list(range(1, config.num_epochs + 1))
  steps = [r["step"] for r in records]
  assert steps[0] > 0 and all(b - a == steps[0] for a, b in zip(steps, steps[1:]))
  assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.2
  assert all(f"valid/{m}" in r for r in records for m in METRIC_NAMES)


def test_each_epoch_reports_its_throughput_over_the_real_tokens(config, reference_run):
  workdir, _ = reference_run
  exp = train_lib.Experiment.from_config(config)
  plan = exp.batch_plan()
  epoch = flops_lib.TokenStats.of_windows(plan.windows, plan.steps_per_epoch())
  assert epoch.tokens_target == plan.windows.num_targets > 0
  for r in metric_writers.read_metrics(workdir):
    assert r["train_targets_per_second"] == pytest.approx(
        epoch.tokens_target / r["train_seconds"])
    assert r["train_gflops_per_second"] == pytest.approx(
        flops_lib.train_flops(exp.model.cfg, epoch)["total"] / r["train_seconds"] / 1e9)


def test_eval_files_hold_the_best_checkpoint_metrics(config, reference_run):
  workdir, results = reference_run
  records = metric_writers.read_metrics(workdir)
  best = max(records, key=lambda r: r["valid/NDCG@10"])
  assert results["step"] == best["step"]
  for split in ("valid", "test"):
    with open(os.path.join(workdir, f"eval_{split}.json")) as f:
      saved = json.load(f)
    assert {"HR@10", "NDCG@10"} <= set(saved)
    assert saved["step"] == results["step"]
    assert {k: saved[k] for k in METRIC_NAMES} == pytest.approx(results[split], rel=1e-9)
  # The restored best state reproduces the validation metrics measured in training.
  assert results["valid"] == pytest.approx(
      {m: best[f"valid/{m}"] for m in METRIC_NAMES}, rel=1e-6, abs=1e-9)


def test_offline_evaluation_round_trips(reference_run):
  workdir, results = reference_run
  saved_config = checkpointing.load_config(workdir)  # What eval.py does without --config.
  offline = eval_lib.evaluate_workdir(saved_config, workdir)
  assert offline["step"] == results["step"]
  for split in ("valid", "test"):
    assert offline[split] == pytest.approx(results[split], rel=1e-6, abs=1e-9)


def test_evaluation_compiles_one_ranking_program_for_both_splits(config, reference_run):
  """Test histories are one item longer; their batches still take the validation shape."""
  workdir, results = reference_run
  exp = train_lib.Experiment.from_config(config)
  valid, test = exp.eval_data("valid"), exp.eval_data("test")
  assert test.lengths.sum() > valid.lengths.sum()
  eval_fn = exp.make_eval_fn()
  offline = eval_lib.evaluate_workdir(config, workdir, experiment=exp, eval_fn=eval_fn)
  assert eval_fn.rank._cache_size() == 1  # pylint: disable=protected-access
  assert offline["valid"] == results["valid"] and offline["test"] == results["test"]


def test_a_config_saved_before_newer_fields_still_evaluates(reference_run, tmp_path):
  workdir, results = reference_run
  old = str(tmp_path / "old_run")
  shutil.copytree(workdir, old)
  with open(os.path.join(old, checkpointing.CONFIG_FILE)) as f:
    saved = json.load(f)
  for field in ("eval_user_block", "steps_per_call", "deterministic"):
    del saved[field]  # Added after the first released runs.
  saved["loss_chunk_size"] = 1024  # What those runs saved.
  saved["eval_batch_size"] = 512
  with open(os.path.join(old, checkpointing.CONFIG_FILE), "w") as f:
    json.dump(saved, f)
  train_lib.check_resumable(old, small_synthetic_config(), allow_config_change=False)
  offline = eval_lib.evaluate_workdir(checkpointing.load_config(old), old)
  assert offline["valid"] == pytest.approx(results["valid"], rel=1e-6, abs=1e-9)


def test_same_config_and_seed_reproduce_the_run(config, reference_run, tmp_path):
  workdir, results = reference_run
  again = train_lib.train_and_evaluate(config, str(tmp_path))
  assert comparable(metric_writers.read_metrics(str(tmp_path))) == comparable(
      metric_writers.read_metrics(workdir))
  assert again["valid"] == results["valid"] and again["test"] == results["test"]


def test_several_steps_per_call_reproduce_the_run(config, reference_run, tmp_path):
  """Three steps per jitted call (8 an epoch: the last call padded) give the same numbers."""
  reference_dir, reference = reference_run
  config = config.copy_and_resolve_references()
  config.steps_per_call = 3
  assert train_lib.Experiment.from_config(config).batch_plan().steps_per_epoch() % 3
  results = train_lib.train_and_evaluate(config, str(tmp_path))
  assert comparable(metric_writers.read_metrics(str(tmp_path))) == comparable(
      metric_writers.read_metrics(reference_dir))
  assert results["valid"] == reference["valid"] and results["test"] == reference["test"]


@pytest.mark.parametrize("checkpoint_every_secs,steps_per_call", [(0.0, -1), (1e9, -1), (0.0, 3)])
def test_interrupted_run_resumes_exactly(config, reference_run, tmp_path, monkeypatch,
                                         checkpoint_every_secs, steps_per_call):
  """SIGTERM inside epoch 3, then a crash inside epoch 5: the resumed run equals the reference.

  The interruptions are triggered from the train call (by the global step it
  reaches), so they do not depend on how far ahead batches are prefetched.
  With checkpoints every epoch the crash loses epoch 5 only; with a time
  interval longer than the run, SIGTERM's checkpoint is the only one before
  the end, and the crash sends the run back to it. With 3 steps per call the
  run stops and resumes between calls.
  """
  workdir = str(tmp_path)
  config = config.copy_and_resolve_references()
  config.checkpoint_every_secs = checkpoint_every_secs
  config.steps_per_call = steps_per_call
  reference_dir, reference = reference_run
  steps_per_epoch = metric_writers.read_metrics(reference_dir)[0]["step"]
  per_call = train_lib.Experiment.from_config(config).steps_per_call
  assert steps_per_epoch > per_call + 1
  original_jit_train_steps = train_lib.Experiment.jit_train_steps
  interrupt = {}  # global step a call reaches -> "sigterm" | "crash"

  def jit_train_steps(self):
    steps_fn = original_jit_train_steps(self)

    def steps(state, batches, rng):
      state, metrics = steps_fn(state, batches, rng)
      how = interrupt.pop(int(state.step), None)
      if how == "sigterm":
        # Never kill the test session: signal only if the trainer handles SIGTERM.
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        os.kill(os.getpid(), signal.SIGTERM)
      elif how == "crash":
        raise RuntimeError("simulated crash")
      return state, metrics

    return steps

  monkeypatch.setattr(train_lib.Experiment, "jit_train_steps", jit_train_steps)

  sigterm_step = 2 * steps_per_epoch + per_call  # After the first call of epoch 3.
  interrupt[sigterm_step] = "sigterm"
  out = train_lib.train_and_evaluate(config, workdir)
  assert out.get("preempted") is True
  assert out["step"] == sigterm_step  # Saved mid-epoch, at the step it stopped.
  assert [r["epoch"] for r in metric_writers.read_metrics(workdir)] == [1, 2]

  interrupt[4 * steps_per_epoch + per_call] = "crash"  # Epoch 5's first call.
  with pytest.raises(RuntimeError, match="simulated crash"):
    train_lib.train_and_evaluate(config, workdir)
  assert [r["epoch"] for r in metric_writers.read_metrics(workdir)] == [1, 2, 3, 4]
  expected_latest = 4 * steps_per_epoch if checkpoint_every_secs == 0 else sigterm_step
  assert max(checkpointing.RunCheckpoints(workdir).latest.all_steps()) == expected_latest

  results = train_lib.train_and_evaluate(config, workdir)
  assert not interrupt  # Both interruptions happened.
  assert comparable(metric_writers.read_metrics(workdir)) == comparable(
      metric_writers.read_metrics(reference_dir))
  assert results["valid"] == reference["valid"] and results["test"] == reference["test"]


def test_checkpoints_throttled_by_time_keep_the_best_state(config, reference_run, tmp_path,
                                                           monkeypatch):
  """With an interval longer than the run, the state is saved once, at the end; the best
  state of an earlier epoch, kept on the device while training went on, is saved with it."""
  reference_dir, _ = reference_run
  records = metric_writers.read_metrics(reference_dir)
  scores = iter([0.1, 0.3, 0.5])  # Early-stopping score of epochs 1-3; 0.2 after: epoch 3 is best.
  evaluate = evaluation.evaluate

  def scripted_evaluate(*args, **kwargs):
    metrics, ranks = evaluate(*args, **kwargs)
    return {**metrics, "NDCG@10": next(scores, 0.2)}, ranks

  monkeypatch.setattr(evaluation, "evaluate", scripted_evaluate)
  throttled = config.copy_and_resolve_references()
  throttled.checkpoint_every_secs = 1e9
  results = train_lib.train_and_evaluate(throttled, str(tmp_path))
  saved = checkpointing.RunCheckpoints(str(tmp_path))
  assert list(saved.latest.all_steps()) == [records[-1]["step"]]
  assert list(saved.best.all_steps()) == [records[2]["step"]] == [results["step"]]
  # The restored best state is epoch 3's: it reproduces the metrics measured then.
  for metric in ("HR@10", "NDCG@20", "MRR"):
    assert results["valid"][metric] == pytest.approx(records[2][f"valid/{metric}"], rel=1e-6)


def test_more_epochs_on_a_finished_workdir_resume_training(config, reference_run, tmp_path):
  reference_dir, _ = reference_run
  workdir = str(tmp_path / "run")
  shutil.copytree(reference_dir, workdir)
  longer = config.copy_and_resolve_references()
  longer.num_epochs = config.num_epochs + 2
  train_lib.train_and_evaluate(longer, workdir)
  records = metric_writers.read_metrics(workdir)
  old = metric_writers.read_metrics(reference_dir)
  assert [r["epoch"] for r in records] == list(range(1, longer.num_epochs + 1))
  assert comparable(records[:len(old)]) == comparable(old)  # Not restarted.
  steps_per_epoch = old[0]["step"]
  assert records[-1]["step"] == longer.num_epochs * steps_per_epoch


def test_workdir_refuses_a_different_model_config(config, reference_run, tmp_path):
  reference_dir, _ = reference_run
  other = config.copy_and_resolve_references()
  other.model.num_heads = 4
  with pytest.raises(checkpointing.CheckpointError, match="model.num_heads"):
    train_lib.train_and_evaluate(other, reference_dir)
  # Forcing it does not silently load mismatched weights, for training or for evaluation.
  workdir = str(tmp_path / "run")
  shutil.copytree(reference_dir, workdir)
  # The error names an array whose saved shape is not the model's.
  names_an_array = r"does not match the model .*: [\w.]+: saved \([\d, ]+\) float32, the model has"
  with pytest.raises(checkpointing.CheckpointError, match=names_an_array):
    train_lib.train_and_evaluate(other, workdir, allow_config_change=True)
  with pytest.raises(checkpointing.CheckpointError, match=names_an_array):
    eval_lib.evaluate_workdir(other, workdir)


def test_a_refused_checkpoint_leaves_no_reads_behind(config, reference_run, monkeypatch):
  # The mismatch is found from the checkpoint's metadata, before any array is read: a restore
  # that failed midway would leave TensorStore reads completing on a closed event loop.
  reference_dir, _ = reference_run
  other = config.copy_and_resolve_references()
  other.model.num_heads = 4
  abstract = train_lib.Experiment.from_config(other).abstract_state()
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  checkpoints = checkpointing.RunCheckpoints(reference_dir)
  try:
    with pytest.raises(checkpointing.CheckpointError, match="does not match the model"):
      checkpoints.restore_best(abstract)
  finally:
    checkpoints.close()
  gc.collect()
  assert not unraisable


def test_evaluating_an_untrained_workdir_is_an_error(config, tmp_path):
  with pytest.raises(checkpointing.CheckpointError):
    eval_lib.evaluate_workdir(config, str(tmp_path))
