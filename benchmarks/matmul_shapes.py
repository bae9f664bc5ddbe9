r"""The output layer's matmuls alone: XLA:CPU (as fame-jax compiles them) against PyTorch.

  python benchmarks/matmul_shapes.py [--items 12101] [--rows 155] [--out FILE.json]

The training loss (`scoring._blocked_pass`) does three matmuls per block of
R = `--rows` positions and each of the catalogue's two parts (V = `--items` / 2
items), for K = `--heads` user vectors of D = `--dim` (FAME: 2 heads, d' = 32):

  logits   [K, R, D] x [K, V, D] -> [K, R, V]
  du       [K, R, V] x [K, V, D] -> [K, R, D]   (the user vectors' gradient)
  dtable   [K, D, R] x [K, R, V] -> [K, D, V]   (the table's gradient, transposed)

and ranking (`scoring._vector_logits`, item-major since 2d5d7d6) one
`[V, D] x [D, B]` per head for each block of B users. Each is timed alone (best of --repeats, both cores), in
fame-jax's `jnp.einsum` spelling and `runtime.compiler_options()`, then with
`torch.einsum` (skipped without torch), next to a square matmul of
`--square` (the shape of bench.py's peak). GFLOP/s per shape show how far
a CPU's XLA kernels fall short of its BLAS for these thin shapes, which differs
by machine (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from fame_jax import runtime  # pylint: disable=wrong-import-position
from fame_jax import scoring  # pylint: disable=wrong-import-position

import bench  # pylint: disable=g-import-not-at-top,wrong-import-position


def best_seconds(fn: Callable[[], Any], repeats: int, sync: Callable[[Any], Any]) -> float:
  sync(fn())  # Compile / warm up.
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    sync(fn())
    best = min(best, time.perf_counter() - start)
  return best


def shapes(args: argparse.Namespace) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...], int]]:
  """name -> (einsum spec, lhs shape, rhs shape, FLOPs)."""
  k, r, d, v, b = args.heads, args.rows, args.dim, args.items // 2, args.users
  block = 2 * k * r * v * d
  return {
      "loss_logits": ("krd,kvd->krv", (k, r, d), (k, v, d), block),
      "loss_du": ("krv,kvd->krd", (k, r, v), (k, v, d), block),
      "loss_dtable": ("kdr,krv->kdv", (k, d, r), (k, r, v), block),
      "rank_logits": ("vd,bd->vb", (args.items, d), (b, d), 2 * b * args.items * d),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--items", type=int, default=12101, help="Catalogue size (Beauty's).")
  parser.add_argument("--rows", type=int, default=155, help="Positions per loss block.")
  parser.add_argument("--dim", type=int, default=32, help="Vector size d'.")
  parser.add_argument("--heads", type=int, default=2, help="K: vectors per position.")
  parser.add_argument("--users", type=int, default=scoring.CPU_USER_BLOCK,
                      help="Users per ranking block.")
  parser.add_argument("--square", type=int, default=2048, help="Side of the square matmul.")
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--skip_torch", action="store_true")
  parser.add_argument("--out", default=None, help="JSON file for the results.")
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  cases = shapes(args)
  cases["square"] = ("ij,jk->ik", (args.square,) * 2, (args.square,) * 2, 2 * args.square ** 3)
  options = runtime.compiler_options()
  results: dict[str, dict[str, float]] = {}
  operands = {name: (rng.standard_normal(lhs, np.float32), rng.standard_normal(rhs, np.float32))
              for name, (_, lhs, rhs, _) in cases.items()}
  for name, (spec, _, _, flops) in cases.items():
    fn = jax.jit(lambda a, b, spec=spec: jnp.einsum(spec, a, b), compiler_options=options)
    a, b = (jnp.asarray(x) for x in operands[name])
    seconds = best_seconds(lambda: fn(a, b), args.repeats, jax.block_until_ready)
    results[name] = {"flops": flops, "xla_ms": 1e3 * seconds, "xla_gflops": flops / seconds / 1e9}
  if not args.skip_torch:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      torch = None
    if torch is not None:
      torch.set_num_threads(os.cpu_count() or 1)
      for name, (spec, _, _, flops) in cases.items():
        a, b = (torch.from_numpy(x) for x in operands[name])
        seconds = best_seconds(lambda: torch.einsum(spec, a, b), args.repeats, lambda x: x)
        results[name].update(torch_ms=1e3 * seconds, torch_gflops=flops / seconds / 1e9)

  print(f"{'shape':14s} {'einsum':14s} {'MFLOP':>8s} {'XLA ms':>8s} {'GFLOP/s':>8s} "
        f"{'torch ms':>9s} {'GFLOP/s':>8s}")
  for name, (spec, _, _, flops) in cases.items():
    row = results[name]
    torch_part = (f"{row['torch_ms']:9.3f} {row['torch_gflops']:8.0f}" if "torch_ms" in row
                  else f"{'-':>9s} {'-':>8s}")
    print(f"{name:14s} {spec:14s} {flops / 1e6:8.1f} {row['xla_ms']:8.3f} "
          f"{row['xla_gflops']:8.0f} {torch_part}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"machine": bench.machine_info(), "args": vars(args),
                 "compiler_options": options, "shapes": results}, f, indent=2, sort_keys=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
