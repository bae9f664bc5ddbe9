r"""Where a fame-jax training step spends its time, next to the same pieces in PyTorch.

  python benchmarks/step_breakdown.py --dataset beauty [--model sasrec] [--repeats 15] [--out F.json]

On one training batch of the dataset config's defaults (the first batch of epoch
0, as fame-jax draws it), times (best of --repeats, the variants interleaved):

  step          Experiment.jit_train_step(): loss, gradients, Adam
  loss_grad     value_and_grad of train_lib.next_item_loss (dropout on)
  body_grad     the network without the output layer: grad of sum(vectors**2)
  output_grad   the output layer alone: grad of train_lib.output_nll w.r.t. the
                user vectors, the item table and W_f (the per-head item tables of
                Eq. 9 and the full-catalogue cross-entropy, scored as the step scores
                it: the CPU kernel, row blocks or item chunks)
  output_fwd    the same, forward only
  logits_fwd    the logits matmul alone, [T, K, D] x [V, D] (or [K, V, D]), materialised
  output_matmuls  (row-blocked loss only) the output layer's three matmuls alone, per row
                block and catalogue part as the step runs them (logits, their product
                with the table, the table's gradient summed over blocks), with no exp
                and no normaliser: what the output layer costs with XLA's kernels if
                everything but its matmuls were free
  torch_*       the same output layer in PyTorch, eager and torch.compile'd

Each runs the loss as the step runs it: `cpu_kernels.fused_nll` where the step uses it
(`--loss_kernel xla` for the row-blocked loss in XLA). `output_matmuls` is XLA's either way.

With the minor page faults per call (`--default_host_memory`: without
`runtime.keep_freed_host_memory`), and lists the catalogue-sized ([..., V])
buffers of the compiled train step's optimized HLO, i.e. how many passes over
T x V memory XLA makes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import resource
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from fame_jax import flops as flops_lib  # pylint: disable=wrong-import-position
from fame_jax import model as model_lib  # pylint: disable=wrong-import-position
from fame_jax import runtime  # pylint: disable=wrong-import-position
from fame_jax import scoring  # pylint: disable=wrong-import-position
from fame_jax import sharding as sharding_lib  # pylint: disable=wrong-import-position
from fame_jax import train_lib  # pylint: disable=wrong-import-position

import bench  # pylint: disable=g-import-not-at-top,wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  bench.add_dataset_args(parser)
  parser.add_argument("--model", default=None, help="Override config.model.name.")
  parser.add_argument("--combine", default=None, help="Override config.model.combine.")
  parser.add_argument("--padded", action="store_true", help="config.data.packing=False.")
  parser.add_argument("--loss_chunk_size", type=int, default=None,
                      help="Override config.loss_chunk_size (0 = materialised logits).")
  parser.add_argument("--loss_row_block", type=int, default=None,
                      help="Override config.loss_row_block (0 = off: item chunks).")
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--skip_torch", action="store_true")
  parser.add_argument("--out", default=None, help="JSON file for the timings.")
  parser.add_argument("--default_host_memory", action="store_true",
                      help="Leave glibc's malloc as it is (no runtime.keep_freed_host_memory).")
  parser.add_argument("--loss_kernel", default=None, choices=("auto", "xla"),
                      help="Override config.loss_kernel (xla: the row-blocked loss in XLA).")
  args = parser.parse_args()
  if not args.default_host_memory:
    runtime.keep_freed_host_memory()  # As train.py: before JAX starts its CPU threads.

  config = bench.dataset_config(args)
  if args.model:
    config.model.name = args.model
  if args.combine:
    config.model.combine = args.combine
  if args.padded:
    config.data.packing = False
  if args.loss_chunk_size is not None:
    config.loss_chunk_size = args.loss_chunk_size
  if args.loss_row_block is not None:
    config.loss_row_block = args.loss_row_block
  if args.loss_kernel is not None:
    config.loss_kernel = args.loss_kernel
  exp = train_lib.Experiment.from_config(config)
  cfg = exp.model.cfg
  batch = bench.epoch_batches(exp)[0]
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  state = exp.init_state()
  params = jax.device_get(state.params)
  rng = jax.random.key(0)
  num_pos = batch["items"].size
  k = cfg.num_vectors
  num_items = cfg.num_items
  table = model_lib.item_tables(params, cfg)  # [V, d], or [H, V, d'] per-head tables (Eq. 9).
  targets = jbatch["targets"].reshape(-1)
  vectors = 0.3 * jax.random.normal(rng, (num_pos, k, cfg.vector_size))
  log_w = jax.nn.log_softmax(jax.random.normal(rng, (num_pos, k)), axis=-1)
  print(f"{exp.dataset.name} {cfg.name} combine={cfg.combine} K={k} "
        f"loss_chunk_size={exp.loss_chunk_size} loss_row_block={exp.loss_row_block} "
        f"fused_loss={exp.fused_loss}: batch "
        f"{batch['items'].shape}, {int((batch['targets'] > 0).sum())} targets, V={num_items}, "
        f"{jax.devices()[0].platform}, load {os.getloadavg()[0]:.1f}")

  fns = {}
  jit = functools.partial(jax.jit, compiler_options=runtime.compiler_options())  # As the step.
  p_step = exp.jit_train_step()
  sharding = sharding_lib.batch_sharding(exp.mesh)
  box = {"state": state}

  def step():
    box["state"], metrics = p_step(box["state"], sharding_lib.global_batch(batch, sharding), rng)
    return box["state"], metrics

  fns["step"] = step

  def loss(p, b, r):
    s, c = train_lib.next_item_loss(exp.model, p, b, r, exp.loss_chunk_size,
                                    row_block=exp.loss_row_block, fused=exp.fused_loss)
    return s / c

  loss_grad = jit(jax.value_and_grad(loss))
  fns["loss_grad"] = lambda: loss_grad(params, jbatch, rng)

  def body(p, b, r):
    out = exp.model.apply({"params": p}, b["items"], segments=b.get("segments"),
                          positions=b.get("positions"), deterministic=False,
                          rngs={"dropout": r})
    return jnp.sum(out.vectors ** 2)

  body_grad = jit(jax.grad(body))
  fns["body_grad"] = lambda: body_grad(params, jbatch, rng)

  def output(v, p):
    return train_lib.output_nll(cfg, p, v, log_w, targets, exp.loss_chunk_size,
                                row_block=exp.loss_row_block, fused=exp.fused_loss)

  # What the output layer reads: the item table, and W_f where heads score against E W_f.
  table_params = {n: params[n] for n in ("item_embedding", "item_projection") if n in params}
  output_grad = jit(jax.grad(output, argnums=(0, 1)))
  output_fwd = jit(output)
  logits_fwd = jit(lambda v, t: scoring._logits(v, t, jnp.float32))  # pylint: disable=protected-access
  fns["output_grad"] = lambda: output_grad(vectors, table_params)
  fns["output_fwd"] = lambda: output_fwd(vectors, table_params)
  fns["logits_fwd"] = lambda: logits_fwd(vectors, table)
  if exp.loss_row_block > 0:
    matmuls = jit(functools.partial(output_matmuls, row_block=exp.loss_row_block))
    fns["output_matmuls"] = lambda: matmuls(vectors, table)

  if not args.skip_torch:
    import torch  # pylint: disable=g-import-not-at-top
    import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(os.cpu_count())
    tv = torch.from_numpy(np.array(vectors)).requires_grad_()
    te = torch.from_numpy(np.array(params["item_embedding"]["embedding"])).requires_grad_()
    tw = torch.from_numpy(np.array(params.get("item_projection", np.zeros(0)))).requires_grad_()
    tlw = torch.from_numpy(np.array(log_w))
    labels = torch.from_numpy(np.asarray(targets)).long() - 1

    def torch_output(v, e, w):
      t = e[1:num_items + 1]
      if cfg.per_head_tables:  # E W_f^(h) (Eq. 9), [H, V, d'].
        t = torch.einsum("vd,hdk->hvk", t, w)
      logits = v @ t.T if t.dim() == 2 else torch.einsum("tkd,kvd->tkv", v, t)  # [T, K, V]
      if k == 1:
        return F.cross_entropy(logits[:, 0], labels, ignore_index=-1, reduction="sum")
      lp = torch.log_softmax(logits, dim=-1).gather(
          -1, labels.clamp(min=0)[:, None, None].expand(-1, k, 1))[..., 0]
      return -(torch.logsumexp(tlw + lp, dim=-1) * (labels >= 0)).sum()

    compiled = torch.compile(torch_output, dynamic=False)

    def run_torch(fn):
      def go():
        tv.grad = te.grad = tw.grad = None
        fn(tv, te, tw).backward()
      return go

    fns["torch_eager_output_grad"] = run_torch(torch_output)
    fns["torch_compile_output_grad"] = run_torch(compiled)

  for fn in fns.values():  # Compile / warm up.
    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  faults = {name: 0 for name in fns}  # Minor page faults (fresh pages the kernel maps in).
  for i in range(args.repeats):
    names = list(fns)
    for j in range(len(names)):
      name = names[(i + j) % len(names)]
      f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
      jax.block_until_ready(fns[name]())
      times[name].append(time.perf_counter() - t0)
      faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
  step_s = min(times["step"])
  # Counted FLOPs (benchmarks/README.md "FLOPs counted") against the matmul peak, measured
  # after the timings (GB-sized matrices first would slow the steps that follow).
  flops = flops_lib.train_flops(cfg, flops_lib.TokenStats.of_batches([batch]))
  peak = bench.matmul_peak([2048, 3072], repeats=3)["gflops"]
  # The output layer's pieces also make the per-head item tables (a d x d projection of
  # the catalogue, counted in the FAME layer's FLOPs) and their gradients.
  output_flops = flops["output_layer"] + (6.0 * num_items * cfg.hidden_size ** 2
                                          if cfg.per_head_tables else 0.0)
  counted = {"step": flops["total"], "loss_grad": flops["total"], "output_grad": output_flops,
             "torch_eager_output_grad": output_flops, "torch_compile_output_grad": output_flops}
  print(f"host memory: {'glibc default' if args.default_host_memory else 'kept'}")
  print(f"{'piece':26} {'best ms':>8} {'median ms':>9} {'of step':>7} {'faults':>7} "
        f"{'GFLOP/s':>8} {'of peak':>7}")
  for name, ts in times.items():
    rate = counted.get(name, 0.0) / min(ts) / 1e9
    print(f"{name:26} {1e3 * min(ts):8.1f} {1e3 * np.median(ts):9.1f} {100 * min(ts) / step_s:6.0f}%"
          f" {faults[name] / len(ts):7.0f}"
          + (f" {rate:8.1f} {100 * rate / peak:6.1f}%" if name in counted else ""))
  print(f"matmul peak {peak:.1f} GFLOP/s (float32 jnp.dot). Counted FLOPs of this step: "
        f"{flops['total'] / 1e9:.2f} G, {100 * flops['output_layer'] / flops['total']:.0f}% in "
        f"the output layer. Were the rest of the step free, the step would run at "
        f"{100 * flops['total'] / min(times['output_grad']) / 1e9 / peak:.1f}% of the peak.")
  floor_s = None
  if "output_matmuls" in times:
    floor_s = step_s - min(times["output_grad"]) + min(times["output_matmuls"])
    print(f"Were the output layer only its matmuls (the rest of the step as it is): a "
          f"{1e3 * floor_s:.1f} ms step, {100 * flops['total'] / floor_s / 1e9 / peak:.1f}% "
          f"of the peak.")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"machine": bench.machine_info(), "args": vars(args),
                 "batch_shape": list(batch["items"].shape), "matmul_peak_gflops": peak,
                 "counted_flops": flops, "best_ms": {n: 1e3 * min(t) for n, t in times.items()},
                 "median_ms": {n: 1e3 * float(np.median(t)) for n, t in times.items()},
                 "minor_faults_per_call": {n: faults[n] / len(t) for n, t in times.items()},
                 "step_fraction_of_peak": flops["total"] / step_s / 1e9 / peak,
                 "matmuls_only_output_layer_step_ms": floor_s and 1e3 * floor_s,
                 "matmuls_only_output_layer_fraction_of_peak":
                     floor_s and flops["total"] / floor_s / 1e9 / peak}, f, indent=2)
    print(f"wrote {args.out}")

  hlo = p_step.lower(box["state"], sharding_lib.global_batch(batch, sharding), rng).compile().as_text()
  big = re.compile(r"^\s*(?:ROOT )?%(\S+) = (f32|bf16|pred|s32)\[([\d,]*)\][^ ]* (fusion|dot|copy|"
                   r"transpose|reduce|exponential|multiply|subtract|add|select|broadcast)\(")
  entries = []
  entry = hlo[hlo.index("ENTRY"):]
  for line in entry.splitlines():
    m = big.match(line)
    if m and num_items in [int(x) for x in m.group(3).split(",") if x]:
      kind = re.search(r'kind=(\w+)', line)
      entries.append(f"{m.group(1)} {m.group(2)}[{m.group(3)}] {m.group(4)}"
                     + (f" {kind.group(1)}" if kind else ""))
  print(f"\ncatalogue-sized buffers written by the train step ({len(entries)}):")
  for e in entries:
    print("  " + e)


def output_matmuls(vectors: jax.Array, table: jax.Array, *, row_block: int) -> jax.Array:
  """The matmuls of `scoring._row_blocked_nll` alone, on its shapes: for each block of
  `row_block` positions and each catalogue part (`scoring.catalogue_bounds`), the
  logits `[K, R, V_p]`, their product with the part (the user vectors' gradient) and
  with the block's vectors (the part's gradient, summed over blocks as the step sums
  it). The logits stand in for the exps."""
  num, k, dim = vectors.shape
  groups = table if table.ndim == 3 else jnp.broadcast_to(table, (k, *table.shape))
  bounds = scoring.catalogue_bounds(groups.shape[1])
  parts = [groups[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
  blocks = -(-num // row_block)
  u = jnp.pad(vectors, [(0, blocks * row_block - num), (0, 0), (0, 0)])
  u = u.reshape(blocks, row_block, k, dim).transpose(0, 2, 1, 3)  # [B, K, R, D]

  def block(acc, u_b):
    logits = [jnp.einsum("krd,kvd->krv", u_b, p) for p in parts]
    du = sum(jnp.einsum("krv,kvd->krd", x, p) for x, p in zip(logits, parts))
    acc = [a + jnp.einsum("kdr,krv->kdv", u_b.swapaxes(1, 2), x) for a, x in zip(acc, logits)]
    return acc, du

  init = [jnp.zeros((k, dim, p.shape[1]), jnp.float32) for p in parts]
  acc, du = jax.lax.scan(block, init, u)
  return sum(jnp.sum(a) for a in acc) + jnp.sum(du)


if __name__ == "__main__":
  main()
