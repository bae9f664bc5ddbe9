r"""The CPU loss kernel's thread groups, side by side: its time for each K and group count.

  python benchmarks/kernel_threads.py [--items 12101] [--positions 1550] [--out FILE.json]

`cpu_kernels.fused_nll` runs G groups of K threads (one a head); each group takes
every G-th block of 32 positions. This times its loss and gradients (jitted, best of
`--repeats`) at one training batch's shape (Beauty's defaults: 31 x 50 packed
positions, 12,101 items, d = 64) for K = `--heads` and G = 1 .. `--max_groups`, and
reports GFLOP/s counting the kernel's matmuls (per head 6 R V D for the logits, dU and
dT, and 6 V d D for T = E W, dW and dE). More threads than cores (K G > cores) shows
what oversubscription costs; `default_groups` (cores // K, within a memory cap) avoids it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from fame_jax import cpu_kernels  # pylint: disable=wrong-import-position

import bench  # pylint: disable=g-import-not-at-top,wrong-import-position


def time_kernel(k: int, groups: int, args: argparse.Namespace) -> float:
  """Best seconds of one loss-and-gradients call."""
  rng = np.random.default_rng(0)
  dim = cpu_kernels.VECTOR_SIZE
  vectors = jnp.asarray(rng.normal(size=(args.positions, k, dim)) / np.sqrt(dim), jnp.float32)
  log_weights = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(args.positions, k)), jnp.float32))
  targets = jnp.asarray(rng.integers(1, args.items + 1, args.positions), jnp.int32)
  embedding = jnp.asarray(rng.normal(size=(args.items + 1, args.width)), jnp.float32)
  projection = jnp.asarray(rng.normal(size=(k, args.width, dim)) / np.sqrt(args.width),
                           jnp.float32)
  grad = jax.jit(jax.value_and_grad(
      lambda u, w, e, p: cpu_kernels.fused_nll(u, w, targets, e, p, args.items, groups),
      argnums=(0, 1, 2, 3)))
  jax.block_until_ready(grad(vectors, log_weights, embedding, projection))  # Compile.
  best = float("inf")
  for _ in range(args.repeats):
    start = time.perf_counter()
    jax.block_until_ready(grad(vectors, log_weights, embedding, projection))
    best = min(best, time.perf_counter() - start)
  return best


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--items", type=int, default=12101, help="Catalogue size V.")
  parser.add_argument("--positions", type=int, default=1550, help="Positions R a call.")
  parser.add_argument("--width", type=int, default=64, help="Embedding size d.")
  parser.add_argument("--heads", type=int, nargs="+", default=[1, 2], help="K values.")
  parser.add_argument("--max_groups", type=int, default=2, help="G = 1 .. this.")
  parser.add_argument("--repeats", type=int, default=20, help="Timed calls; the best counts.")
  parser.add_argument("--out", default=None, help="JSON file for the results.")
  args = parser.parse_args(argv)
  if not cpu_kernels.available():
    sys.exit("kernel_threads: the kernel does not build here (it needs an x86 CPU with "
             "AVX-512 and C and C++ compilers)")
  cores = cpu_kernels.cores()
  rows = []
  print(f"{cores} cores; V={args.items}, R={args.positions}, d={args.width}")
  print(f"{'K':>3} {'groups':>6} {'threads':>7} {'ms':>8} {'GFLOP/s':>8}  default")
  for k in args.heads:
    flops = k * (6 * args.positions * args.items + 6 * args.items * args.width) \
        * cpu_kernels.VECTOR_SIZE
    for groups in range(1, args.max_groups + 1):
      seconds = time_kernel(k, groups, args)
      default = groups == cpu_kernels.default_groups(k, args.items)
      rows.append({"heads": k, "groups": groups, "threads": k * groups, "seconds": seconds,
                   "gflops_per_second": flops / seconds / 1e9, "default": default})
      print(f"{k:>3} {groups:>6} {k * groups:>7} {seconds * 1e3:>8.2f} "
            f"{flops / seconds / 1e9:>8.1f}  {'*' if default else ''}", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"machine": bench.machine_info(), "cores_used": cores, "args": vars(args),
                 "runs": rows}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
