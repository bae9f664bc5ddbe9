r"""Profiles fame-jax's training step: how many kernels a step runs, and where the time goes.

  python benchmarks/profile_step.py --dataset beauty --out profile.json
  python benchmarks/profile_step.py --dataset beauty --model sasrec --steps 20

Runs `--steps` training steps of the dataset config (the first batches of epoch
0, dispatched back to back as the training loop does) under `jax.profiler.trace`,
then reads the Perfetto trace it writes (no TensorBoard needed) and reports, per
step: the kernels (GPU/TPU) or XLA thunks (CPU) executed, their summed
duration, and the wall time, so that `busy = kernel time / wall time` says
whether the device computes or waits (for launches, the host, transfers).
The ops that take the most time are listed by name. The raw trace stays in
`--trace_dir` for Perfetto (ui.perfetto.dev) or TensorBoard's profiler.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from fame_jax import runtime  # pylint: disable=wrong-import-position
from fame_jax import sharding as sharding_lib  # pylint: disable=wrong-import-position
from fame_jax import train_lib  # pylint: disable=wrong-import-position

import bench  # pylint: disable=g-import-not-at-top,wrong-import-position

# Host-side bookkeeping events of the CPU runtime and Python frames: not ops.
_NOT_OPS = re.compile(r"^(end: |\$|ThreadpoolListener|ThunkExecutor|SlinkyThreadPool|Wait for|"
                      r"PjRt|TfrtCpu|ExecuteHelper|Thunk)")


def load_trace(trace_dir: str) -> list[dict[str, Any]]:
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                           recursive=True))
  if not paths:
    raise FileNotFoundError(f"{trace_dir}: no perfetto_trace.json.gz was written")
  with gzip.open(paths[-1]) as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def op_events(events: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
  """The complete events that are device kernels (or, on CPU, XLA ops), and where they ran."""
  processes = {e["pid"]: e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  device_pids = {pid for pid, name in processes.items() if "/device:" in name}
  complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
  if device_pids:
    ops = [e for e in complete if e["pid"] in device_pids]
    return ", ".join(sorted(processes[p] for p in device_pids)), ops
  threads = {(e["pid"], e["tid"]): e["args"].get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  ops = [e for e in complete if "XLA" in threads.get((e["pid"], e["tid"]), "")
         and not _NOT_OPS.match(e["name"])]
  return "host (XLA CPU ops)", ops


def busy_time(ops: list[dict[str, Any]]) -> float:
  """Microseconds during which at least one op runs (the union of their intervals)."""
  total, end = 0.0, float("-inf")
  for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in ops):
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total


def summarize(ops: list[dict[str, Any]], steps: int, wall_s: float, top: int) -> dict[str, Any]:
  by_name: dict[str, list[float]] = collections.defaultdict(list)
  for e in ops:
    by_name[e["name"]].append(e["dur"])
  summed_us = sum(e["dur"] for e in ops)
  busy_us = busy_time(ops)
  span_us = (max(e["ts"] + e["dur"] for e in ops) - min(e["ts"] for e in ops)) if ops else 0.0
  ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
  return {
      "steps": steps,
      "wall_ms_per_step": 1e3 * wall_s / steps,
      "ops_per_step": len(ops) / steps,
      "op_time_ms_per_step": summed_us / 1e3 / steps,
      "busy_ms_per_step": busy_us / 1e3 / steps,
      "busy_fraction_of_span": busy_us / span_us if span_us else None,
      "median_op_us": sorted(e["dur"] for e in ops)[len(ops) // 2] if ops else None,
      "top_ops": [{"name": name, "calls_per_step": len(d) / steps,
                   "ms_per_step": sum(d) / 1e3 / steps} for name, d in ranked],
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  bench.add_dataset_args(parser)
  parser.add_argument("--model", default=None, help="Override config.model.name.")
  parser.add_argument("--steps", type=int, default=10, help="Training steps traced.")
  parser.add_argument("--top", type=int, default=15, help="Ops listed by time.")
  parser.add_argument("--trace_dir", default=None, help="Where the trace goes (default: a temp dir).")
  parser.add_argument("--out", default=None, help="JSON file for the summary.")
  args = parser.parse_args()
  runtime.keep_freed_host_memory()  # As train.py: before JAX starts its CPU threads.

  config = bench.dataset_config(args)
  if args.model:
    config.model.name = args.model
  exp = train_lib.Experiment.from_config(config)
  batches = bench.epoch_batches(exp)[:args.steps]
  sharding = sharding_lib.batch_sharding(exp.mesh)
  device_batches = [sharding_lib.global_batch(b, sharding) for b in batches]
  step = exp.jit_train_step()
  state = exp.init_state()
  rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  for batch in bench.first_of_each_shape(batches):  # Compile outside the trace.
    state, metrics = step(state, sharding_lib.global_batch(batch, sharding), rng)
  jax.block_until_ready((state, metrics))

  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="fame_profile_")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    start = time.perf_counter()
    for batch in device_batches:
      state, metrics = step(state, batch, rng)
    jax.block_until_ready((state, metrics))
    wall_s = time.perf_counter() - start
  where, ops = op_events(load_trace(trace_dir))
  summary = {"dataset": exp.dataset.name, "model": config.model.name,
             "device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend(),
             "jax": jax.__version__, "batch_shape": list(batches[0]["items"].shape),
             "loss_chunk_size": exp.loss_chunk_size, "loss_row_block": exp.loss_row_block,
             "ops_from": where, "trace_dir": trace_dir,
             **summarize(ops, len(batches), wall_s, args.top)}

  print(f"{summary['dataset']} {summary['model']} on {summary['device_kind']} "
        f"({where}), batch {summary['batch_shape']}, {len(batches)} steps traced")
  print(f"per step: {summary['wall_ms_per_step']:.2f} ms wall, {summary['ops_per_step']:.0f} ops, "
        f"{summary['op_time_ms_per_step']:.2f} ms summed op time, {summary['busy_ms_per_step']:.2f} "
        f"ms with an op running (median op {summary['median_op_us'] or 0:.1f} us)")
  print(f"{'op':60} {'calls/step':>10} {'ms/step':>8}")
  for op in summary["top_ops"]:
    print(f"{op['name'][:60]:60} {op['calls_per_step']:10.1f} {op['ms_per_step']:8.3f}")
  print(f"trace: {trace_dir}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(summary, f, indent=2)


if __name__ == "__main__":
  main()
