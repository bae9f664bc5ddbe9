"""Multi-process (multi-host) training: two `train.py` processes on 127.0.0.1 equal one process.

Two CPU processes with 2 devices each (jax.distributed + gloo collectives, 4
devices in all) train the same config as test_faults.py's uninterrupted
single-process run on 4 devices, in one shared workdir, and must write its
metrics.jsonl and eval_*.json. The run has 2 epochs rather than 1 so that this
reference (trained once per session) can be reused, and so that both processes
save mid-epoch, end-of-epoch and best checkpoints concurrently.

Not bit for bit: gloo sums the gradients of the two processes in another order
than the single process sums its 4 devices', so parameters differ in the last
bit or two (seen: 2.7e-7 relative after 18 steps); metrics must agree to 1e-6.
"""

from __future__ import annotations

import os
import re
import socket
import time

import jax
import numpy as np
import pytest

import test_faults as faults
from conftest import NUM_DEVICES
from fame_jax import metric_writers

pytestmark = pytest.mark.slow

NUM_PROCESSES = 2
# Messages of a JAX build that cannot run CPU collectives across processes.
_UNAVAILABLE = re.compile(
    r"(gloo|collectives?|jax\.distributed)[^\n]{0,200}(not (available|supported|implemented|built)"
    r"|unavailable|unimplemented|unsupported)", re.IGNORECASE)


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_all(procs: list[faults.Proc], timeout: float, grace: float = 30.0) -> list[int]:
  """Exit codes. Once one process fails (exits non-zero, or prints a Python traceback: it
  then usually waits for its peer forever), all get `grace` seconds and are then killed."""
  deadline = time.monotonic() + timeout
  failed_at = None
  while True:
    codes = [p.popen.poll() for p in procs]
    if all(c is not None for c in codes):
      return codes
    now = time.monotonic()
    if failed_at is None and (any(c not in (None, 0) for c in codes) or
                              any("Traceback (most recent call last)" in p.stderr for p in procs)):
      failed_at = now
    if now > deadline or (failed_at is not None and now > failed_at + grace):
      for p in procs:
        p.kill()
      if now > deadline:
        pytest.fail(f"multi-process run did not finish within {timeout}s\n" +
                    "\n".join(p.tail() for p in procs))
      return [p.popen.poll() for p in procs]
    time.sleep(0.5)


def test_two_processes_reproduce_the_single_process_run(tmp_path_factory, tmp_path):
  if not hasattr(jax, "distributed") or not hasattr(jax.distributed, "initialize"):
    pytest.skip("this JAX has no jax.distributed")
  if "jax_cpu_collectives_implementation" not in jax.config.values:
    pytest.skip("this JAX cannot select CPU collectives (gloo) for multi-process runs")
  reference = faults.reference_run(tmp_path_factory)  # One process, NUM_DEVICES devices.

  workdir = str(tmp_path / "run")
  port = _free_port()
  env = faults.subprocess_env(num_devices=NUM_DEVICES // NUM_PROCESSES)
  procs = [
      faults.start(faults.cli_args(workdir, extra=[
          f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={NUM_PROCESSES}",
          f"--process_id={i}"]), tmp_path, f"process_{i}", env=env)
      for i in range(NUM_PROCESSES)]
  try:
    codes = _wait_all(procs, timeout=240)
  finally:
    for p in procs:
      p.kill()
  if any(codes):
    logs = "\n".join(p.stderr for p in procs)
    if _UNAVAILABLE.search(logs):
      pytest.skip(f"multi-process CPU runs unavailable here: {_UNAVAILABLE.search(logs)[0]}")
  assert codes == [0] * NUM_PROCESSES, "\n".join(p.tail() for p in procs)

  for p in procs:  # Each process saw the global device set.
    assert f"{NUM_DEVICES} device(s)" in p.stderr, p.tail()
  assert "best checkpoint: step" in procs[0].stdout

  records = metric_writers.read_metrics(workdir)  # Written by process 0 only.
  want = faults.comparable(metric_writers.read_metrics(reference))
  assert [r["epoch"] for r in records] == list(range(1, faults.NUM_EPOCHS + 1)), records
  for got_record, want_record in zip(faults.comparable(records), want):
    assert sorted(got_record) == sorted(want_record)
    assert got_record == pytest.approx(want_record, rel=1e-6, abs=1e-9)
  for split in faults.SPLITS:
    got_eval, want_eval = faults.read_eval(workdir, split), faults.read_eval(reference, split)
    assert got_eval["step"] == want_eval["step"] and sorted(got_eval) == sorted(want_eval)
    assert got_eval == pytest.approx(want_eval, rel=1e-6, abs=1e-9), split

  # The checkpoint both processes wrote restores, in one process, to the reference's state
  # (up to the summation order: relative distance of all parameters, seen ~1e-6).
  got, want = faults._restore_latest(workdir), faults._restore_latest(reference)
  assert int(got[0].step) == int(want[0].step)
  got_progress, want_progress = got[1]["progress"], want[1]["progress"]
  for key in ("epoch", "step_in_epoch", "finished", "best_epoch", "evals_without_improvement"):
    assert got_progress[key] == want_progress[key], key
  got_params = np.concatenate([np.ravel(x) for x in jax.tree.leaves(got[0].params)])
  want_params = np.concatenate([np.ravel(x) for x in jax.tree.leaves(want[0].params)])
  assert np.linalg.norm(got_params - want_params) <= 1e-4 * np.linalg.norm(want_params)
