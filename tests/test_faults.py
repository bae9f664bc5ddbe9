"""Runs that survive interruption: real `train.py` processes killed and pre-empted,
interrupted or corrupt checkpoint writes, a changed config, a NaN loss.

One uninterrupted CLI run (`reference_run`, trained once per session and also
used by test_multiprocess.py) is the yardstick: every interrupted-and-resumed
run must reproduce its metrics.jsonl and eval_*.json exactly (same config and
seed; only wall-clock fields differ). The subprocesses inherit the session's
compilation cache from conftest.py (JAX_COMPILATION_CACHE_DIR), and the
in-process runs here use the same config and 4 CPU devices, so they share the
compiled programs: the train step is compiled twice (a fresh state's step
counter is a weakly typed int32, a restored one is not) and once more for the
NaN test.
"""

from __future__ import annotations

import dataclasses
import gc
import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import NUM_DEVICES
from conftest import comparable
from conftest import REPO_ROOT
from conftest import load_config
from fame_jax import checkpointing
from fame_jax import metric_writers
from fame_jax import train_lib

pytestmark = [
    pytest.mark.slow,
    # Orbax leaves un-awaited read coroutines behind when a damaged checkpoint fails to restore.
    pytest.mark.filterwarnings("ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:coroutine '_read_array_index_and_device_put' was never "
                               "awaited:RuntimeWarning"),
]

# configs/synthetic.py shrunk to a 9-steps-per-epoch run with a checkpoint every
# 2 steps (steps 2, 4, 6, 8, 9 of each epoch). The SASRec baseline compiles in
# about half the time of FAME on a CPU, and what is tested here (the epoch loop,
# checkpoints, resume) is the same code for both models; FAME's resume is
# covered in-process by test_end_to_end.py.
OVERRIDES: dict[str, Any] = {
    "model.name": "sasrec",
    "data.synthetic.num_users": 300,
    "data.synthetic.num_items": 100,
    "data.max_len": 10,
    "data.length_buckets": (0,),
    "model.hidden_size": 16,
    "model.ffn_size": 32,
    "model.num_layers": 1,
    "model.num_experts": 2,
    "num_epochs": 2,
    "batch_size": 64,
    "eval_batch_size": 128,
    "checkpoint_every_steps": 2,
    "checkpoint_every_secs": 0.0,
    "early_stop_patience": 100,
}
NUM_EPOCHS = OVERRIDES["num_epochs"]
RUN_TIMEOUT_S = 300  # Per process; a hang fails the test instead of stalling CI.
SPLITS = ("valid", "test")


# --------------------------------------------------------------------------- helpers


def _flag_value(value: Any) -> str:
  if isinstance(value, tuple):
    return "(" + "".join(f"{v}," for v in value) + ")"
  return str(value)


def cli_args(workdir: str, overrides: dict[str, Any] | None = None,
             extra: list[str] | None = None) -> list[str]:
  """`python train.py --config configs/synthetic.py ...` for this file's run."""
  args = [sys.executable, "train.py", "--config=configs/synthetic.py", f"--workdir={workdir}"]
  args += [f"--config.{k}={_flag_value(v)}" for k, v in {**OVERRIDES, **(overrides or {})}.items()]
  return args + list(extra or [])


def inprocess_config(overrides: dict[str, Any] | None = None):
  """The config that `cli_args(..., overrides)` builds, for `train_lib.train_and_evaluate`."""
  config = load_config("synthetic")
  for key, value in {**OVERRIDES, **(overrides or {})}.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = getattr(node, p)
    setattr(node, leaf, value)
  return config


def subprocess_env(num_devices: int = NUM_DEVICES) -> dict[str, str]:
  """CPU only, `num_devices` fake devices; the session's compilation cache (from conftest)."""
  env = dict(os.environ)
  xla_flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{xla_flags} --xla_force_host_platform_device_count={num_devices}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["FAME_JAX_CACHE_DIR"] = ""  # Never ~/.cache; JAX_COMPILATION_CACHE_DIR (conftest's) is used.
  env["PYTHONUNBUFFERED"] = "1"
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(key, None)  # Only test_multiprocess.py asks for several processes.
  return env


@dataclasses.dataclass
class Proc:
  """A `train.py` subprocess whose stdout and stderr go to files in `log_dir`."""
  popen: subprocess.Popen
  name: str
  out_path: str
  err_path: str

  @property
  def stdout(self) -> str:
    with open(self.out_path, errors="replace") as f:
      return f.read()

  @property
  def stderr(self) -> str:
    with open(self.err_path, errors="replace") as f:
      return f.read()

  def tail(self, n: int = 3000) -> str:
    return (f"--- {self.name} stdout (tail) ---\n{self.stdout[-n:]}\n"
            f"--- {self.name} stderr (tail) ---\n{self.stderr[-n:]}")

  def kill(self) -> None:
    if self.popen.poll() is None:
      self.popen.kill()  # This process only, by its own handle.
      self.popen.wait()

  def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
    try:
      return self.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f"{self.name} did not finish within {timeout}s\n{self.tail()}")


def start(args: list[str], log_dir, name: str, env: dict[str, str] | None = None) -> Proc:
  out_path = os.path.join(str(log_dir), f"{name}.stdout")
  err_path = os.path.join(str(log_dir), f"{name}.stderr")
  with open(out_path, "w") as out, open(err_path, "w") as err:
    popen = subprocess.Popen(args, cwd=REPO_ROOT, env=env or subprocess_env(), stdout=out,
                             stderr=err, stdin=subprocess.DEVNULL)
  return Proc(popen, name, out_path, err_path)


def run_cli(args: list[str], log_dir, name: str, expect_rc: int = 0) -> Proc:
  proc = start(args, log_dir, name)
  rc = proc.wait()
  assert rc == expect_rc, f"{name}: exit code {rc}, expected {expect_rc}\n{proc.tail()}"
  return proc


def finalized_steps(workdir: str, kind: str = "latest") -> list[int]:
  """Steps of complete checkpoints (Orbax renames a temporary directory when done)."""
  root = os.path.join(workdir, "checkpoints", kind)
  return sorted(int(n) for n in os.listdir(root) if n.isdigit()) if os.path.isdir(root) else []


def wait_for_checkpoint(proc: Proc, workdir: str, timeout: float = RUN_TIMEOUT_S) -> int:
  """Polls until the first complete "latest" checkpoint exists; returns its step."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    steps = finalized_steps(workdir)
    if steps:
      return steps[0]
    if proc.popen.poll() is not None:
      pytest.fail(f"{proc.name} exited ({proc.popen.returncode}) before its first "
                  f"checkpoint\n{proc.tail()}")
    time.sleep(0.02)
  proc.kill()
  pytest.fail(f"no checkpoint in {workdir} after {timeout}s\n{proc.tail()}")


def checkpoint_progress(workdir: str, step: int) -> train_lib.Progress:
  """The `Progress` saved with latest/<step> (read with Orbax, without the arrays)."""
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "latest"),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  finally:
    manager.close()
  return train_lib.Progress.from_json(meta["progress"])


def read_eval(workdir: str, split: str) -> dict[str, Any]:
  with open(os.path.join(workdir, f"eval_{split}.json")) as f:
    return json.load(f)


def assert_same_results(workdir: str, reference: str, num_epochs: int = NUM_EPOCHS) -> None:
  """Exactly the reference's per-epoch records (one per epoch) and final evaluation."""
  records = metric_writers.read_metrics(workdir)
  assert [r["epoch"] for r in records] == list(range(1, num_epochs + 1)), records
  assert comparable(records) == comparable(metric_writers.read_metrics(reference))
  for split in SPLITS:
    assert read_eval(workdir, split) == read_eval(reference, split), split


def copy_workdir(reference: str, tmp_path) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  return workdir


def absl_messages(caplog) -> str:
  return "\n".join(r.getMessage() for r in caplog.records)


_REFERENCE: dict[str, str] = {}


def reference_run(tmp_path_factory) -> str:
  """Workdir of one uninterrupted `train.py` run of this file's config (once per session)."""
  if "workdir" not in _REFERENCE:
    root = tmp_path_factory.mktemp("uninterrupted")
    workdir = str(root / "run")
    run_cli(cli_args(workdir), root, "uninterrupted")
    records = metric_writers.read_metrics(workdir)
    assert [r["epoch"] for r in records] == list(range(1, NUM_EPOCHS + 1))
    assert all(np.isfinite(r["train_loss"]) and "valid/NDCG@10" in r for r in records)
    _REFERENCE["workdir"] = workdir
  return _REFERENCE["workdir"]


@pytest.fixture
def reference(tmp_path_factory) -> str:
  return reference_run(tmp_path_factory)


@pytest.fixture
def steps_per_epoch(reference) -> int:
  return metric_writers.read_metrics(reference)[0]["step"]


@pytest.fixture
def absl_info(caplog):
  caplog.set_level(logging.INFO, logger="absl")
  return caplog


# --------------------------------------------------------------------------- killed processes


def test_sigkill_mid_epoch_then_rerun_reproduces_the_uninterrupted_run(reference, tmp_path):
  workdir = str(tmp_path / "run")
  proc = start(cli_args(workdir), tmp_path, "killed")
  try:
    wait_for_checkpoint(proc, workdir)
    proc.popen.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
  assert proc.wait() == -signal.SIGKILL, f"not killed: it had already finished\n{proc.tail()}"
  newest = finalized_steps(workdir)[-1]
  progress = checkpoint_progress(workdir, newest)
  assert progress.step_in_epoch > 0 and not progress.finished, (newest, progress)  # Mid-epoch.
  assert not os.path.exists(os.path.join(workdir, "eval_test.json"))

  resumed = run_cli(cli_args(workdir), tmp_path, "rerun")
  assert (f"Resuming from step {newest} (epoch {progress.epoch + 1}, batch "
          f"{progress.step_in_epoch})") in resumed.stderr, resumed.tail()
  assert_same_results(workdir, reference)


def test_sigterm_checkpoints_the_current_step_exits_0_and_resumes_exactly(
    reference, steps_per_epoch, tmp_path):
  workdir = str(tmp_path / "run")
  proc = start(cli_args(workdir), tmp_path, "sigterm")
  try:
    wait_for_checkpoint(proc, workdir)  # The SIGTERM handler is installed by now.
    proc.popen.send_signal(signal.SIGTERM)
    rc = proc.wait()
  finally:
    proc.kill()
  assert rc == 0, proc.tail()
  match = re.search(r"pre-empted: state saved at step (\d+)", proc.stdout)
  assert match, proc.tail()
  stopped_at = int(match.group(1))
  assert 0 < stopped_at < NUM_EPOCHS * steps_per_epoch
  assert "Pre-empted (SIGTERM)" in proc.stderr
  # The checkpoint of the step it stopped at is complete and the newest one.
  assert finalized_steps(workdir)[-1] == stopped_at
  progress = checkpoint_progress(workdir, stopped_at)
  assert progress.epoch * steps_per_epoch + progress.step_in_epoch == stopped_at
  assert not progress.finished
  assert not os.path.exists(os.path.join(workdir, "eval_test.json"))

  resumed = run_cli(cli_args(workdir), tmp_path, "rerun")
  assert f"Resuming from step {stopped_at} " in resumed.stderr, resumed.tail()
  assert_same_results(workdir, reference)


# --------------------------------------------------------------------------- damaged checkpoints


def test_partial_checkpoint_directory_is_ignored(reference, tmp_path, absl_info):
  """A finished run plus a newer step's Orbax temporary directory (a write cut short)."""
  workdir = copy_workdir(reference, tmp_path)
  newest = finalized_steps(workdir)[-1]
  partial = os.path.join(workdir, "checkpoints", "latest",
                         f"{newest + 5}.orbax-checkpoint-tmp-1234")
  os.makedirs(os.path.join(partial, "state"))
  with open(os.path.join(partial, "state", "manifest.ocdbt"), "wb") as f:
    f.write(b"\x00junk")
  config = inprocess_config()
  assert checkpointing.config_differences(checkpointing.load_saved_config_dict(workdir),
                                          config) == []  # Same config as the CLI run.

  results = train_lib.train_and_evaluate(config, workdir)
  log = absl_messages(absl_info)
  assert f"Ignoring incomplete checkpoint {partial}" in log
  assert f"Resuming from step {newest} " in log
  assert results["step"] == read_eval(reference, "test")["step"]
  assert_same_results(workdir, reference)


def test_crash_while_writing_the_last_checkpoint_resumes_from_the_one_before(
    reference, steps_per_epoch, tmp_path, absl_info):
  """What a crash during the final save leaves: latest/<N>'s temporary directory, no latest/<N>
  (best/<N> and the epoch's metrics line were already written). Rerun with more epochs."""
  workdir = copy_workdir(reference, tmp_path)
  latest = os.path.join(workdir, "checkpoints", "latest")
  *_, before, newest = finalized_steps(workdir)
  assert newest == NUM_EPOCHS * steps_per_epoch and before == newest - 1
  shutil.rmtree(os.path.join(latest, str(newest)))
  partial = os.path.join(latest, f"{newest}.orbax-checkpoint-tmp-1700000000")
  os.makedirs(os.path.join(partial, "state", "d"))
  with open(os.path.join(partial, "state", "d", "0123abcd"), "wb") as f:
    f.write(os.urandom(64))

  longer = inprocess_config({"num_epochs": NUM_EPOCHS + 1})
  train_lib.train_and_evaluate(longer, workdir)
  log = absl_messages(absl_info)
  assert f"Ignoring incomplete checkpoint {partial}" in log
  assert f"Resuming from step {before} (epoch {NUM_EPOCHS}, batch {steps_per_epoch - 1})" in log
  records = metric_writers.read_metrics(workdir)
  assert [r["epoch"] for r in records] == list(range(1, NUM_EPOCHS + 2))  # One line per epoch.
  assert comparable(records[:NUM_EPOCHS]) == comparable(metric_writers.read_metrics(reference))
  assert records[-1]["step"] == (NUM_EPOCHS + 1) * steps_per_epoch
  assert finalized_steps(workdir)[-1] == (NUM_EPOCHS + 1) * steps_per_epoch


def _newest_state_files(workdir: str, pattern: str) -> list[str]:
  newest = finalized_steps(workdir)[-1]
  files = glob.glob(os.path.join(workdir, "checkpoints", "latest", str(newest), "state", pattern),
                    recursive=True)
  assert files, pattern
  return files


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(
    reference, steps_per_epoch, tmp_path, absl_info):
  """The newest complete checkpoint's array data truncated (e.g. a disk filled up)."""
  workdir = copy_workdir(reference, tmp_path)
  *_, before, newest = finalized_steps(workdir)
  for path in _newest_state_files(workdir, "**/d/*"):
    if os.path.isfile(path):
      with open(path, "r+b") as f:
        f.truncate(3)

  results = train_lib.train_and_evaluate(inprocess_config(), workdir)
  log = absl_messages(absl_info)
  assert re.search(rf"Checkpoint \S+/latest/{newest} is unreadable .*; falling back to step "
                   rf"{before}\.", log), log[-3000:]
  assert f"Resuming from step {before} (epoch {NUM_EPOCHS}, batch {steps_per_epoch - 1})" in log
  assert results["step"] == newest
  assert_same_results(workdir, reference)  # The redone last step equals the original one.
  assert finalized_steps(workdir)[-1] == newest  # The unreadable checkpoint was replaced.
  state, meta = _restore_latest(workdir)
  assert int(state.step) == newest and meta["progress"]["epoch"] == NUM_EPOCHS
  gc.collect()  # Orbax's abandoned read coroutines: reported (and filtered) here.


def _restore_latest(workdir: str, config=None):
  exp = train_lib.Experiment.from_config(config or inprocess_config())
  checkpoints = checkpointing.RunCheckpoints(workdir)
  try:
    return checkpoints.restore_latest(exp.abstract_state())
  finally:
    checkpoints.close()


def test_checkpoint_missing_its_array_index_falls_back(reference, tmp_path, absl_info):
  """The newest checkpoint's OCDBT manifest gone: unreadable, not "another config"."""
  workdir = copy_workdir(reference, tmp_path)
  *_, before, newest = finalized_steps(workdir)
  for path in _newest_state_files(workdir, "**/manifest.ocdbt"):
    os.remove(path)
  state, meta = _restore_latest(workdir)
  assert int(state.step) == before
  assert meta["progress"]["step_in_epoch"] > 0
  assert re.search(rf"/latest/{newest} .*falling back to step {before}",
                   absl_messages(absl_info)), absl_messages(absl_info)[-3000:]
  gc.collect()


# --------------------------------------------------------------------------- config changes


def test_resuming_with_another_num_heads_fails_with_one_line_naming_the_field(reference, tmp_path):
  workdir = copy_workdir(reference, tmp_path)
  with open(os.path.join(workdir, checkpointing.CONFIG_FILE)) as f:
    saved_config = f.read()
  steps, records = finalized_steps(workdir), metric_writers.read_metrics(workdir)

  proc = run_cli(cli_args(workdir, {"model.num_heads": 4}), tmp_path, "num_heads", expect_rc=1)
  assert "Traceback" not in proc.stderr, proc.tail()
  last_line = proc.stderr.strip().splitlines()[-1]
  assert last_line.startswith("error: "), proc.tail()
  assert "model.num_heads: 2 -> 4" in last_line and "--allow_config_change" in last_line
  assert "config.json" in last_line
  # Nothing in the workdir was touched.
  with open(os.path.join(workdir, checkpointing.CONFIG_FILE)) as f:
    assert f.read() == saved_config
  assert finalized_steps(workdir) == steps and metric_writers.read_metrics(workdir) == records

  other = inprocess_config({"model.num_heads": 4})
  with pytest.raises(checkpointing.CheckpointError) as error:
    train_lib.check_resumable(workdir, other, allow_config_change=False)
  assert "\n" not in str(error.value) and "model.num_heads: 2 -> 4" in str(error.value)
  # Forcing it cannot load weights of other shapes: still an error, not a fresh start.
  with pytest.raises(checkpointing.CheckpointError, match="does not match the model"):
    train_lib.train_and_evaluate(other, workdir, allow_config_change=True)
  assert finalized_steps(workdir) == steps
  gc.collect()


def test_allow_config_change_resumes_when_shapes_are_compatible(reference, tmp_path, absl_info):
  workdir = copy_workdir(reference, tmp_path)
  newest = finalized_steps(workdir)[-1]
  changed = inprocess_config({"model.dropout": 0.3, "model.attention_dropout": 0.1})
  with pytest.raises(checkpointing.CheckpointError, match=r"model\.attention_dropout: 0\.2 -> 0\.1"):
    train_lib.train_and_evaluate(changed, workdir)

  results = train_lib.train_and_evaluate(changed, workdir, allow_config_change=True)
  assert f"Resuming from step {newest} " in absl_messages(absl_info)
  saved = checkpointing.load_config(workdir)
  assert saved.model.dropout == 0.3 and saved.model.attention_dropout == 0.1
  # The same weights were restored: evaluation (dropout off) gives the reference's numbers.
  for split in SPLITS:
    assert read_eval(workdir, split) == read_eval(reference, split)
    assert {"step": results["step"], **results[split]} == read_eval(reference, split)


# --------------------------------------------------------------------------- NaN


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch, steps_per_epoch):
  bad_from = steps_per_epoch + 3  # The 4th update of epoch 2 (state.step 12) is the first NaN.
  original_step, original_loss = train_lib.train_step, train_lib.next_item_loss

  def nan_from_step(state, batch, rng, **kwargs):
    def loss(*args, **kwargs):
      loss_sum, count = original_loss(*args, **kwargs)
      return loss_sum * jnp.where(state.step >= bad_from, jnp.nan, 1.0), count

    train_lib.next_item_loss = loss  # Only while this step is being traced.
    try:
      return original_step(state, batch, rng, **kwargs)
    finally:
      train_lib.next_item_loss = original_loss

  monkeypatch.setattr(train_lib, "train_step", nan_from_step)
  workdir = str(tmp_path / "run")
  with pytest.raises(train_lib.NonFiniteLossError) as error:
    train_lib.train_and_evaluate(inprocess_config(), workdir)
  message = str(error.value)
  assert re.search(rf"\bstep {bad_from}\b", message), message
  assert "epoch 2" in message

  # Checkpoints: 2, 4, 6, 8 inside each epoch and one at its end; none from the NaN step on.
  every = OVERRIDES["checkpoint_every_steps"]
  saves = [e * steps_per_epoch + k for e in range(NUM_EPOCHS)
           for k in list(range(every, steps_per_epoch, every)) + [steps_per_epoch]]
  last_good = max(s for s in saves if s <= bad_from)
  assert finalized_steps(workdir)[-1] == last_good < bad_from
  assert [r["epoch"] for r in metric_writers.read_metrics(workdir)] == [1]
  state, meta = _restore_latest(workdir)
  assert int(state.step) == last_good
  assert meta["progress"]["epoch"] == 1 and meta["progress"]["step_in_epoch"] == (
      last_good - steps_per_epoch)
  assert np.isfinite(meta["progress"]["loss_sum"])
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    assert np.all(np.isfinite(np.asarray(leaf)))
