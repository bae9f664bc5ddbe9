r"""Profiles fame-jax's training step: how many kernels a step runs, and where the time goes.

  python benchmarks/profile_step.py --dataset beauty --out profile.json
  python benchmarks/profile_step.py --dataset beauty --model sasrec --steps 20

Runs `--steps` training steps of the dataset config (the first batches of epoch
0, dispatched back to back as the training loop does) under `jax.profiler.trace`,
then reads the Perfetto trace it writes (no TensorBoard needed) and reports, per
step: the kernels (GPU/TPU) or XLA thunks (CPU) executed, their summed
duration, and the wall time, so that `busy = kernel time / wall time` says
whether the device computes or waits (for launches, the host, transfers).
The ops that take the most time are listed by name, and the time of all ops
by where in the code they come from (`--scope_depth`): the Flax module or
`jax.named_scope` in their HLO metadata (`fame_layer`, `block_0/attention`,
`next_item_nll`, `item_tables`, `optimizer`, ...), forward or backward. (The
row-blocked loss, `scoring._row_blocked_nll`, takes its gradients in its
forward pass, so they count as forward.) The raw trace stays in `--trace_dir`
for Perfetto (ui.perfetto.dev) or TensorBoard's profiler.
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


# An HLO instruction and its `op_name` metadata if it has one (compiled HLO text, one per line).
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?(?:op_name=\"([^\"]*)\"[^\n]*)?$",
                          re.M)
# Name-stack components that wrap a name in a transformation: unwrapped (jit's: dropped).
_WRAPPER = re.compile(r"^(jit|jvp|transpose|vmap|pjit|remat|checkpoint|shard_map)\((.*)\)$")
_CONTROL_FLOW = re.compile(r"^(while|body|cond|closed_call|branch_\d+_fun)$")


def scope_of(op_name: str, depth: int) -> tuple[str, str]:
  """("forward" or "backward", scope) of an HLO `op_name` such as
  `jit(train_step)/transpose(jvp(SequenceRecommender))/SequenceRecommender._facet_heads/
  fame_layer/vmap(heads)/blnm,bmk->blnk/dot_general`: its first `depth` names (Flax
  submodules, `jax.named_scope`s, einsum specs), here ("backward", "fame_layer/heads").

  Transformations are unwrapped, control flow and library functions (`jit(_where)`)
  left out, and so are Flax's class-named scopes (`SequenceRecommender._facet_heads`,
  `Dropout_0`): their ops count for the enclosing scope. "(step)" when none is left.
  """
  parts = op_name.split("/")
  direction = "backward" if any(p.startswith("transpose(") for p in parts) else "forward"
  names = []
  for part in parts[1:-1]:  # parts[0] is jit(<the function>), the last part the primitive.
    while (match := _WRAPPER.match(part)) and match.group(1) != "jit":
      part = match.group(2)
    if part and not _WRAPPER.match(part) and not _CONTROL_FLOW.match(part) and not part[0].isupper():
      names.append(part)
  return direction, "/".join(names[:depth]) or "(step)"


def op_scopes(hlo_text: str, depth: int) -> dict[str, tuple[str, str]]:
  """Instruction name -> `scope_of` its op_name ("(no metadata)" without one), for every
  instruction of compiled HLO text (the names the CPU trace gives its ops, and GPU
  kernels their fusions')."""
  return {name: scope_of(op_name, depth) if op_name else ("-", "(no metadata)")
          for name, op_name in _INSTRUCTION.findall(hlo_text)}


def time_by_scope(ops: list[dict[str, Any]], scopes: dict[str, tuple[str, str]],
                  steps: int) -> list[dict[str, Any]]:
  """Summed op time and op count per step for each (scope, direction), largest first;
  ops whose name the program does not hold count as "(not in the program)"."""
  totals: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
  for e in ops:
    direction, scope = scopes.get(e["name"], ("-", "(not in the program)"))
    totals[scope, direction][0] += e["dur"]
    totals[scope, direction][1] += 1
  return [{"scope": scope, "direction": direction, "ms_per_step": us / 1e3 / steps,
           "ops_per_step": count / steps}
          for (scope, direction), (us, count) in sorted(totals.items(), key=lambda kv: -kv[1][0])]


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
  parser.add_argument("--loss_row_block", type=int, default=None,
                      help="Override config.loss_row_block (0 = off: the whole catalogue or "
                           "item chunks; -1 = auto).")
  parser.add_argument("--steps", type=int, default=10, help="Training steps traced.")
  parser.add_argument("--top", type=int, default=15, help="Ops listed by time.")
  parser.add_argument("--scope_depth", type=int, default=1,
                      help="Names of the code scope ops are summed by (2: fame_layer/heads).")
  parser.add_argument("--trace_dir", default=None, help="Where the trace goes (default: a temp dir).")
  parser.add_argument("--out", default=None, help="JSON file for the summary.")
  args = parser.parse_args()
  runtime.keep_freed_host_memory()  # As train.py: before JAX starts its CPU threads.

  config = bench.dataset_config(args)
  if args.model:
    config.model.name = args.model
  if args.loss_row_block is not None:
    config.loss_row_block = args.loss_row_block
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
  shapes = {tuple(b["items"].shape) for b in batches}
  # Instruction names are per program: attribute ops only when one program ran.
  scopes = (op_scopes(step.lower(state, device_batches[0], rng).compile().as_text(),
                      args.scope_depth) if len(shapes) == 1 else None)
  summary = {"dataset": exp.dataset.name, "model": config.model.name,
             "device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend(),
             "jax": jax.__version__, "batch_shape": list(batches[0]["items"].shape),
             "loss_chunk_size": exp.loss_chunk_size, "loss_row_block": exp.loss_row_block,
             "ops_from": where, "trace_dir": trace_dir,
             **summarize(ops, len(batches), wall_s, args.top),
             "by_scope": time_by_scope(ops, scopes, len(batches)) if scopes else None}

  print(f"{summary['dataset']} {summary['model']} on {summary['device_kind']} "
        f"({where}), batch {summary['batch_shape']}, {len(batches)} steps traced")
  print(f"per step: {summary['wall_ms_per_step']:.2f} ms wall, {summary['ops_per_step']:.0f} ops, "
        f"{summary['op_time_ms_per_step']:.2f} ms summed op time, {summary['busy_ms_per_step']:.2f} "
        f"ms with an op running (median op {summary['median_op_us'] or 0:.1f} us)")
  print(f"{'op':60} {'calls/step':>10} {'ms/step':>8}")
  for op in summary["top_ops"]:
    print(f"{op['name'][:60]:60} {op['calls_per_step']:10.1f} {op['ms_per_step']:8.3f}")
  if summary["by_scope"]:
    print(f"{'scope':52} {'pass':>8} {'ops/step':>8} {'ms/step':>8}")
    for row in summary["by_scope"]:
      print(f"{row['scope'][:52]:52} {row['direction']:>8} {row['ops_per_step']:8.1f} "
            f"{row['ms_per_step']:8.3f}")
  else:
    print(f"(no time by scope: the traced batches ran {len(shapes)} programs)")
  print(f"trace: {trace_dir}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(summary, f, indent=2)


if __name__ == "__main__":
  main()
