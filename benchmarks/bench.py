r"""fame-jax vs a plain PyTorch FAME: training-epoch and full-ranking-evaluation time.

  python benchmarks/bench.py --dataset beauty --out bench_beauty.json
  python benchmarks/bench.py --dataset beauty --max_steps 8 --eval_users 2048 --out quick.json

On one machine and on the SAME batches of the dataset (epoch 0
of `fame_jax.data`, the dataset config's defaults, batch 256), it measures:

1. fame-jax FAME and SASRec (`Experiment.init_state / jit_train_step /
   make_eval_fn`, `fame_jax.evaluation.evaluate`): a training epoch on the
   batches fame-jax's training loop draws (packed rows when
   `config.data.packing`, else length-bucketed padded rows), and a full-ranking
   evaluation pass over the validation users; also FAME on the padded batches;
2. benchmarks/torch_reference.py, the same FAME in PyTorch, eager and
   `torch.compile`d, from the same initial parameters (the Flax init, loaded),
   with the same Adam, on the padded `[B, L]` batches a PyTorch user would run
   (and, eager, on fame-jax's packed batches); the same full-ranking evaluation;
3. a parity check: the deterministic (no dropout) loss of a padded and of a
   packed batch under the trained fame-jax FAME parameters, fame-jax vs torch,
   and how many evaluation ranks agree;
4. the float32 matmul peak of the machine (best jnp.dot of 2048^3 .. 4096^3),
   after the fame-jax runs and again at the end, best kept;
5. peak RSS (resource.getrusage) of fame-jax's process and of PyTorch's.

On a GPU the PyTorch reference runs on the GPU too (`--torch_device`), with
TF32 float32 matmuls in both frameworks.

Compile time is excluded from every epoch and evaluation time and reported
apart: every distinct batch shape is run twice first (compile = first call -
second call), and the first evaluation pass compiles.

The machine may be shared (load average in the JSON), so the runs are
INTERLEAVED in two phases, fame-jax runs first and PyTorch runs after, in a
process of its own (so that neither framework's heap and thread pool sits
between the other's steps, and PyTorch gets glibc's malloc as its users have
it, not the one fame-jax's `runtime.keep_freed_host_memory` sets up; with
`--torch_host_memory kept` it gets that one too): step i of every run of the
phase, then step i+1, ...; each step is timed to completion
(block_until_ready / eager torch), and the sum of its steps is `epoch_blocked_s`.
A fame-jax epoch is then also timed as the training loop runs it
(`--pipelined_epochs` rounds, interleaved by epoch, best kept): calls of
`steps_per_call` steps (1 on CPU) dispatched back to back while the next
batches are transferred (`prefetch_to_mesh`), one sync at the end. That is
fame-jax's `epoch_s`: blocking after every step costs it the overlap of the
host with the device, which matters where steps are short (a GPU); on 2 CPU
cores (~75 ms steps) the two agree within noise.
PyTorch's steps are synchronous on a CPU, so its `epoch_s` is the sum of its
steps. Evaluation passes are interleaved likewise, `--eval_repeats` rounds, best pass
kept, each run's batches built once beforehand (as the trainer builds its validation
batches), the building timed apart (`*_eval_batches_s`). Noise from other processes
then hits the runs of a phase alike, and the ratios are the result:
`speedup_vs_torch_eager = torch_eager_epoch_s / fame_epoch_s`,
`eval_speedup_vs_torch = torch_eager_eval_s / fame_eval_s`, and
`matmul_peak_fraction`: the FLOP rate fame-jax's FAME training step reaches,
counting only the FLOPs the real (non-padding) tokens need (`fame_jax.flops`),
over the matmul peak.

With `--max_steps N` only the first N batches of the epoch are timed and each
epoch time is extrapolated by padded positions (a step's cost is dominated by
the `[B*L, V]` output layer, linear in B*L); `--eval_users N` times evaluation
on N evenly spaced validation users and scales by users.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import importlib
import importlib.metadata
import json
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from fame_jax import data as data_lib  # pylint: disable=wrong-import-position
from fame_jax import evaluation  # pylint: disable=wrong-import-position
from fame_jax import flops as flops_lib  # pylint: disable=wrong-import-position
from fame_jax import runtime  # pylint: disable=wrong-import-position
from fame_jax import scoring  # pylint: disable=wrong-import-position
from fame_jax import sharding as sharding_lib  # pylint: disable=wrong-import-position
from fame_jax import train_lib  # pylint: disable=wrong-import-position

DATASET_CONFIGS = {"beauty": "beauty", "sports": "sports", "toys": "toys", "yelp": "yelp"}


def rss_mb() -> float:
  """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------
# Matmul peak.


def matmul_peak(sizes: list[int], repeats: int) -> dict[str, Any]:
  """Best float32 jnp.dot rate over sizes x repeats (GFLOP/s)."""
  dot = jax.jit(jnp.dot)
  per_size = {}
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      dot(a, b).block_until_ready()
      best = min(best, time.perf_counter() - t0)
    per_size[str(n)] = 2.0 * n ** 3 / best / 1e9
  return {"gflops": max(per_size.values()), "per_size_gflops": per_size}


def torch_matmul_peak(sizes: list[int], repeats: int, device: str = "cpu") -> float:
  import torch  # pylint: disable=g-import-not-at-top
  best_rate = 0.0
  for n in sizes:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    for _ in range(repeats):
      t0 = time.perf_counter()
      torch.mm(a, b).sum().item()  # .item() waits for the device.
      best_rate = max(best_rate, 2.0 * n ** 3 / (time.perf_counter() - t0) / 1e9)
  return best_rate


def default_torch_device() -> str:
  """"cuda" when fame-jax runs on a GPU and PyTorch sees one, else "cpu"."""
  if jax.default_backend() != "gpu":
    return "cpu"
  import torch  # pylint: disable=g-import-not-at-top
  return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------
# Runs: one model in one framework on one batch layout, stepped one batch at a time.


def first_of_each_shape(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
  seen, out = set(), []
  for b in batches:
    if b["items"].shape not in seen:
      seen.add(b["items"].shape)
      out.append(b)
  return out


class Run:
  """Common bookkeeping; subclasses implement `step` (blocking) and optionally `eval_pass`."""
  has_eval = False
  framework = "jax"

  def __init__(self, key: str, label: str, layout: str, cfg: Any):
    self.key, self.label, self.layout, self.cfg = key, label, layout, cfg
    self.step_s: list[float] = []
    self.loss_sum, self.num_targets = 0.0, 0.0
    self.compile_s = self.warmup_s = 0.0
    self.eval_s: list[float] = []
    self.eval_first_s = None
    self.eval_batches = None  # The evaluation pass's batches, built once (`prepare_eval`).
    self.eval_batches_s = None  # Seconds that took.
    self.eval_result = None
    self.pipelined_s: list[float] = []  # Epochs timed back to back (fame-jax runs only).
    self.faults_per_step: list[float] = []  # Minor page faults per step of those epochs.
    self.eval_faults: list[int] = []  # Minor page faults of each timed evaluation pass.

  def step(self, batch: dict[str, np.ndarray]) -> tuple[float, float]:
    raise NotImplementedError

  def build_eval_batches(self, data: data_lib.EvalData) -> list:
    raise NotImplementedError

  def eval_pass(self, data: data_lib.EvalData) -> tuple[dict[str, float], np.ndarray]:
    raise NotImplementedError

  def prepare_eval(self, data: data_lib.EvalData) -> None:
    """Builds the evaluation batches once, as a training loop does for its validation
    passes (fame-jax's `Experiment.eval_batches`), and times that apart."""
    t0 = time.perf_counter()
    self.eval_batches = self.build_eval_batches(data)
    self.eval_batches_s = time.perf_counter() - t0

  def warm_up(self, batches: list[dict[str, np.ndarray]]) -> None:
    t_start = time.perf_counter()
    for b in batches:
      t0 = time.perf_counter()
      self.step(b)
      t1 = time.perf_counter()
      self.step(b)
      t2 = time.perf_counter()
      self.compile_s += max(0.0, (t1 - t0) - (t2 - t1))
    self.warmup_s = time.perf_counter() - t_start

  def timed_step(self, batch: dict[str, np.ndarray]) -> None:
    t0 = time.perf_counter()
    loss_sum, count = self.step(batch)
    self.step_s.append(time.perf_counter() - t0)
    self.loss_sum += loss_sum
    self.num_targets += count

  def timed_eval(self, data: data_lib.EvalData) -> None:
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    self.eval_result = self.eval_pass(data)
    dt = time.perf_counter() - t0
    if self.eval_first_s is None:
      self.eval_first_s = dt  # Compiles.
    else:
      self.eval_s.append(dt)
      self.eval_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)


class JaxRun(Run):
  """fame-jax: Experiment.init_state / jit_train_step(s) / make_eval_fn + evaluation.evaluate."""

  def __init__(self, key, label, layout, exp: train_lib.Experiment, has_eval: bool):
    super().__init__(key, label, layout, exp.model.cfg)
    self.exp, self.has_eval = exp, has_eval
    self.state = exp.init_state()
    self.p_step = exp.jit_train_step()
    self.sharding = sharding_lib.batch_sharding(exp.mesh)
    self.p_steps, self.steps_per_call = exp.jit_train_steps(), exp.steps_per_call
    self.stacked_sharding = sharding_lib.stacked_batch_sharding(exp.mesh)
    self.rng = jax.random.fold_in(jax.random.key(exp.config.seed), 1)  # As the training loop.
    self.eval_fn = exp.make_eval_fn() if has_eval else None

  def warm_up(self, batches: list[dict[str, np.ndarray]]) -> None:
    super().warm_up(batches)
    for batch in batches if self.steps_per_call > 1 else []:
      # Compiles `train_steps` for each shape, on empty batches: no update.
      empty = {k: np.zeros_like(v) for k, v in batch.items()}
      stack = data_lib.stack_batches([empty], self.steps_per_call)
      self.state, _ = self.p_steps(self.state, sharding_lib.global_batch(
          stack, self.stacked_sharding), self.rng)

  def step(self, batch):
    self.state, metrics = self.p_step(self.state, sharding_lib.global_batch(batch, self.sharding),
                                      self.rng)
    jax.block_until_ready((self.state, metrics))
    return float(metrics["loss_sum"]), float(metrics["num_targets"])

  def pipelined_epoch(self, batches: list[dict[str, np.ndarray]]) -> float:
    """Seconds for `batches` as the training loop runs them: `steps_per_call` at a time
    (`train_lib.train_steps`), dispatched back to back, transferred ahead
    (`prefetch_to_mesh`), the metrics read once at the end."""
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    k, metrics = self.steps_per_call, []
    if k == 1:  # `jit_train_step`: the same XLA program as one-step calls, without the
      # stacking axis (a second, alternating program made this process page-fault).
      for batch in sharding_lib.prefetch_to_mesh(iter(batches), self.sharding):
        self.state, m = self.p_step(self.state, batch, self.rng)
        metrics.append(m)
    else:
      stacks = (data_lib.stack_batches(batches[i:i + k], k) for i in range(0, len(batches), k))
      for stack in sharding_lib.prefetch_to_mesh(stacks, self.stacked_sharding):
        self.state, m = self.p_steps(self.state, stack, self.rng)
        metrics.append(m)
    jax.device_get(metrics)
    dt = time.perf_counter() - t0
    self.pipelined_s.append(dt)
    # Minor page faults (memory the kernel maps in afresh) per step; see
    # runtime.keep_freed_host_memory.
    self.faults_per_step.append(
        (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / len(batches))
    return dt

  def build_eval_batches(self, data):
    exp = self.exp
    return evaluation.host_batches(data, exp.eval_batch_size, exp.buckets, exp.mesh,
                                   exp.config.data.packing)

  def eval_pass(self, data):
    exp = self.exp
    return evaluation.evaluate(self.eval_fn, self.state.params, data, exp.eval_batch_size,
                               exp.buckets, exp.mesh, exp.config.data.packing,
                               self.eval_batches)


class TorchRun(Run):
  """benchmarks/torch_reference.py, eager or torch.compile'd, with torch.optim.Adam."""
  framework = "torch"

  # What the parent process gets back from the PyTorch phase's process (`finished`).
  RECORD = ("key", "label", "layout", "cfg", "has_eval", "framework", "step_s", "loss_sum",
            "num_targets", "compile_s", "warmup_s", "eval_s", "eval_first_s", "eval_result",
            "eval_faults", "pipelined_s", "eval_batches_s")

  def record(self) -> dict[str, Any]:
    return {name: getattr(self, name) for name in self.RECORD}

  @staticmethod
  def finished(record: dict[str, Any]) -> Run:
    """A plain `Run` holding a finished PyTorch run's timings and results."""
    run = Run(record["key"], record["label"], record["layout"], record["cfg"])
    run.__dict__.update(record)
    return run

  def __init__(self, key, label, layout, cfg, init_params, lr: float, compile_: bool,
               literal: bool, buckets, eval_batch_size: int, has_eval: bool, device: str):
    super().__init__(key, label, layout, cfg)
    import torch  # pylint: disable=g-import-not-at-top
    import torch_reference  # pylint: disable=g-import-not-at-top
    self.torch, self.has_eval, self.device = torch, has_eval, device
    self.module = torch_reference.SequenceRecommender(cfg, literal_item_projection=literal)
    torch_reference.load_flax_params(self.module, init_params)
    self.module.to(device)
    self.module.train()
    # optax.adam(1e-3): b1 0.9, b2 0.999, eps 1e-8; PyTorch's default (foreach) implementation.
    self.opt = torch.optim.Adam(self.module.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    self.loss_fn = torch.compile(self.module.loss, dynamic=False) if compile_ else self.module.loss
    self.keys = ("items", "targets") + (("segments", "positions") if layout == "packed" else ())
    self.buckets, self.eval_batch_size = buckets, eval_batch_size
    if has_eval:  # Evaluated on fame-jax's trained parameters (set_eval_params), for the ranks.
      self.eval_module = torch_reference.SequenceRecommender(cfg, literal_item_projection=literal)
      self.eval_module.to(device).eval()
      self.rank_fn = (torch.compile(self.eval_module.ranks, dynamic=False) if compile_
                      else self.eval_module.ranks)

  def set_eval_params(self, params) -> None:
    import torch_reference  # pylint: disable=g-import-not-at-top
    torch_reference.load_flax_params(self.eval_module, params)

  def step(self, batch):
    torch = self.torch
    inputs = {k: torch.from_numpy(batch[k]).long().to(self.device) for k in self.keys}
    self.opt.zero_grad(set_to_none=True)
    loss = self.loss_fn(**inputs)
    loss.backward()
    self.opt.step()
    count = float((batch["targets"] > 0).sum())
    return float(loss.detach()) * count, count  # float() waits for the device.

  def build_eval_batches(self, data):
    return list(data_lib.eval_batches(data, self.eval_batch_size, self.buckets))

  def eval_pass(self, data):
    torch = self.torch
    ranks = np.empty(len(data.targets), np.int64)
    with torch.inference_mode():
      for batch, index in self.eval_batches:
        t = {k: torch.from_numpy(v).long().to(self.device) for k, v in batch.items()}
        ranks[index] = self.rank_fn(t["items"], t["lengths"], t["targets"],
                                    t["exclude"])[:len(index)].cpu().numpy()
    return scoring.metrics_from_ranks(ranks), ranks


def jax_loss(exp: train_lib.Experiment, params, batch: dict[str, np.ndarray]) -> float:
  """Deterministic (no dropout) mean loss of `batch` under `params` in fame-jax."""
  loss_fn = jax.jit(lambda p, b: train_lib.next_item_loss(
      exp.model, p, b, None, exp.loss_chunk_size, row_block=exp.loss_row_block,
      fused=exp.fused_loss))
  loss_sum, count = loss_fn(params, {k: jnp.asarray(v) for k, v in batch.items()})
  return float(loss_sum) / float(count)


def torch_loss(cfg, params, batch: dict[str, np.ndarray]) -> float:
  """The same loss in the torch reference (run in the PyTorch phase's process)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top
  module = torch_reference.SequenceRecommender(cfg)
  torch_reference.load_flax_params(module, params)
  module.eval()
  with torch.no_grad():
    return float(module.loss(**{k: torch.from_numpy(v).long() for k, v in batch.items()}))


# ---------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
  except OSError:
    pass
  info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
          "platform": platform.platform(), "jax_devices": [str(d) for d in jax.devices()],
          "device_kind": jax.devices()[0].device_kind,
          "load_avg_start": os.getloadavg()}
  for mod in ("jax", "jaxlib", "flax", "optax", "numpy", "torch"):
    try:  # Versions without importing (torch is imported only for its own phase).
      info[mod] = importlib.metadata.version(mod)
    except importlib.metadata.PackageNotFoundError:
      info[mod] = None
  try:
    info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                        text=True, check=True).stdout.strip()
    info["fame_jax_uncommitted_changes"] = bool(subprocess.run(
        ["git", "status", "--porcelain", "fame_jax", "configs"], cwd=REPO, capture_output=True,
        text=True, check=True).stdout.strip())
  except (OSError, subprocess.CalledProcessError):  # Not a git checkout (e.g. an exported copy).
    info["git_commit"] = os.environ.get("FAME_BENCH_GIT_COMMIT")
  return info


def epoch_batches(exp: train_lib.Experiment) -> list[dict[str, np.ndarray]]:
  """Epoch 0's training batches, exactly as fame-jax's training loop draws them."""
  return list(exp.batch_plan().batches(exp.config.seed, 0))


def with_overrides(config, **overrides):
  config = config.copy_and_resolve_references()
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
  """--dataset and --data_dir, shared by the scripts of benchmarks/."""
  parser.add_argument("--dataset", default="beauty", choices=sorted(DATASET_CONFIGS))
  parser.add_argument("--data_dir", default=os.environ.get(
      "FAME_DATA_DIR", os.path.join(os.path.dirname(REPO), "shared", "data")),
      help="Folder with the dataset files (default $FAME_DATA_DIR, else ../shared/data).")


def dataset_config(args: argparse.Namespace):
  """The dataset's config from configs/, reading its file from --data_dir."""
  config = importlib.import_module(f"configs.{DATASET_CONFIGS[args.dataset]}").get_config()
  config.data.dir = args.data_dir
  return config


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_dataset_args(parser)
  parser.add_argument("--out", default=None, help="JSON file for the results.")
  parser.add_argument("--max_steps", type=int, default=0,
                      help="Time only the first N batches of the epoch and extrapolate (0 = all).")
  parser.add_argument("--eval_users", type=int, default=0,
                      help="Time evaluation on N evenly spaced validation users and scale (0 = all).")
  parser.add_argument("--pipelined_epochs", type=int, default=2,
                      help="fame-jax epochs timed as the training loop runs them (back to back, "
                           "one sync), interleaved by epoch, best kept; 0 = fame-jax's epoch_s is "
                           "the sum of its blocked steps, as PyTorch's.")
  parser.add_argument("--eval_repeats", type=int, default=2,
                      help="Timed evaluation passes per run (after the compiling one); best kept.")
  parser.add_argument("--skip_torch", action="store_true", help="fame-jax only.")
  parser.add_argument("--skip_torch_compile", action="store_true")
  parser.add_argument("--skip_sasrec", action="store_true")
  parser.add_argument("--skip_same_batches", action="store_true",
                      help="When fame-jax packs: skip fame-jax on padded batches and torch on "
                           "packed ones.")
  parser.add_argument("--skip_torch_compile_packed", action="store_true",
                      help="Skip torch.compile on fame-jax's packed batches.")
  parser.add_argument("--torch_user_side_eq9", action="store_true",
                      help="Torch FAME applies Eq. 9 on the user side (W_f F^(h) against E, H times "
                           "the output-layer FLOPs of the per-head item tables fame-jax uses).")
  parser.add_argument("--torch_device", default=None,
                      help="Where the PyTorch reference runs (default: cuda when fame-jax runs on "
                           "a GPU and PyTorch sees one, else cpu). On CUDA, float32 matmuls use "
                           "TF32 in both frameworks (JAX's GPU default; PyTorch is set to match).")
  parser.add_argument("--torch_host_memory", choices=("default", "kept"), default="default",
                      help="The PyTorch phase runs in a process of its own, with glibc's malloc "
                           "as PyTorch users have it (default), or kept as fame-jax sets it up "
                           "(runtime.keep_freed_host_memory; PyTorch page-faults less too).")
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="torch.set_num_threads (default: all cores).")
  parser.add_argument("--keep_compile_caches", action="store_true",
                      help="Let JAX / TorchInductor use their persistent compile caches (default: "
                           "cold compiles, so that compile times are honest).")
  parser.add_argument("--loss_row_block", type=int, default=None,
                      help="Override config.loss_row_block for fame-jax (0 = item chunks).")
  parser.add_argument("--loss_kernel", default=None, choices=("auto", "xla"),
                      help="Override config.loss_kernel for fame-jax (xla: no CPU kernel).")
  parser.add_argument("--matmul_sizes", default="2048,3072,4096")
  parser.add_argument("--matmul_repeats", type=int, default=5)
  return parser.parse_args(argv)


def cold_compile_caches(keep: bool) -> dict[str, Any]:
  """Compile times are measured cold: no persistent XLA cache, a fresh TorchInductor cache dir."""
  jax.config.update("jax_enable_compilation_cache", keep)
  if not keep:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fame_bench_inductor_")
  return {"compile_caches": "kept" if keep else "cold",
          "torchinductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}


def run_phase(runs: list[Run], layouts, timed, valid, args, results: dict[str, Any]) -> None:
  """Warm-up, then the epoch interleaved (step i of every run, then step i + 1), then the
  compiling evaluation pass and `--eval_repeats` interleaved timed passes."""
  if not runs:
    return
  for run in runs:
    log(f"{run.label} [{run.layout}]: warm-up / compile")
    run.warm_up(first_of_each_shape(layouts[run.layout]))
    results["rss_mb_after"][f"warmup_{run.key}"] = rss_mb()
    log(f"  compile {run.compile_s:.1f}s (warm-up {run.warmup_s:.1f}s)")
  num_timed = len(timed[runs[0].layout])
  log(f"interleaved epoch: {num_timed} steps x {len(runs)} runs")
  t_epoch = time.perf_counter()
  for i in range(num_timed):
    for j in range(len(runs)):
      run = runs[(i + j) % len(runs)]  # Rotate who goes first.
      run.timed_step(timed[run.layout][i])
    if (i + 1) % 10 == 0 or i + 1 == num_timed:
      results["machine"].setdefault("load_avg_1min_during_epoch", []).append(os.getloadavg()[0])
      log(f"  step {i + 1}/{num_timed} ({time.perf_counter() - t_epoch:.0f}s, load "
          f"{os.getloadavg()[0]:.1f}): "
          + ", ".join(f"{r.key} {sum(r.step_s):.1f}s" for r in runs))
  pipelined = [r for r in runs if isinstance(r, JaxRun)]
  for rep in range(args.pipelined_epochs if pipelined else 0):
    for j in range(len(pipelined)):
      run = pipelined[(rep + j) % len(pipelined)]
      run.pipelined_epoch(timed[run.layout])
    log(f"  pipelined epochs, round {rep + 1}/{args.pipelined_epochs}: "
        + ", ".join(f"{r.key} {r.pipelined_s[-1]:.2f}s" for r in pipelined))
  results["rss_mb_after"][f"epoch_{runs[0].key}"] = rss_mb()
  eval_runs = [r for r in runs if r.has_eval]
  for run in eval_runs:
    run.prepare_eval(valid)
    log(f"{run.label}: evaluation batches built in {run.eval_batches_s:.3f}s; first pass "
        "(compiles)")
    run.timed_eval(valid)
  for rep in range(args.eval_repeats):
    for j in range(len(eval_runs)):
      eval_runs[(rep + j) % len(eval_runs)].timed_eval(valid)
    log(f"  evaluation round {rep + 1}/{args.eval_repeats}: "
        + ", ".join(f"{r.key} {r.eval_s[-1]:.2f}s ({r.eval_faults[-1]} faults)" for r in eval_runs))
  results["rss_mb_after"][f"eval_{runs[0].key}"] = rss_mb()


def torch_phase(job: dict[str, Any]) -> dict[str, Any]:
  """The PyTorch runs (interleaved among themselves) and the torch side of the parity check.

  Runs in a process of its own (`run_torch_phase`), so that PyTorch gets the host
  memory allocator it has when its users run it, not the one fame-jax sets up.
  """
  if job["keep_freed"]:
    runtime.keep_freed_host_memory()
  import torch  # pylint: disable=g-import-not-at-top
  args, device = job["args"], job["device"]
  torch.set_num_threads(args.threads)
  if device.startswith("cuda"):
    torch.set_float32_matmul_precision("high")  # TF32, as JAX's default on the same GPU.
  out: dict[str, Any] = {"rss_mb_after": {}, "machine": {}, "torch_device": device,
                         "torch_threads": torch.get_num_threads(),
                         "torch_host_memory": "kept" if job["keep_freed"] else "default"}
  out["torch_matmul_peak_gflops"] = torch_matmul_peak(
      job["sizes"], max(2, args.matmul_repeats // 2), device)
  log(f"float32 matmul peak (torch.mm on {device}): {out['torch_matmul_peak_gflops']:.1f} GFLOP/s")
  common = dict(cfg=job["cfg"], init_params=job["init_params"], lr=job["lr"],
                literal=not args.torch_user_side_eq9, buckets=job["buckets"],
                eval_batch_size=job["eval_batch_size"], device=device)
  runs = [TorchRun("torch_eager", "torch eager FAME", "padded", compile_=False, has_eval=True,
                   **common)]
  if not args.skip_torch_compile:
    runs.append(TorchRun("torch_compile", "torch.compile FAME", "padded", compile_=True,
                         has_eval=True, **common))
  if job["packs"] and not args.skip_same_batches:
    runs.append(TorchRun("torch_eager_packed", "torch eager FAME", "packed", compile_=False,
                         has_eval=False, **common))
    if not (args.skip_torch_compile_packed or args.skip_torch_compile):
      runs.append(TorchRun("torch_compile_packed", "torch.compile FAME", "packed",
                           compile_=True, has_eval=False, **common))
  for run in runs:
    if run.has_eval:
      run.set_eval_params(job["trained_params"])
  run_phase(runs, job["layouts"], job["timed"], job["valid"], args, out)
  out["losses"] = {name: torch_loss(job["cfg"], job["trained_params"], batch)
                   for name, batch in job["checks"].items()}
  out["runs"] = [run.record() for run in runs]
  out["load_avg_1min_during_epoch"] = out.pop("machine").get("load_avg_1min_during_epoch", [])
  out["torch_peak_rss_mb"] = rss_mb()
  return out


def run_torch_phase(job: dict[str, Any], host_memory: str) -> dict[str, Any]:
  """`torch_phase` in a fresh (spawned) process: glibc's malloc as a PyTorch user has it
  ("default"), or set up as fame-jax's (`runtime.keep_freed_host_memory`, "kept")."""
  job = {**job, "keep_freed": host_memory == "kept"}
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
    return pool.submit(torch_phase, job).result()


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  runtime.keep_freed_host_memory()  # As train.py: before JAX starts its CPU threads.
  caches = cold_compile_caches(args.keep_compile_caches)
  config = dataset_config(args)
  if args.loss_row_block is not None:
    config.loss_row_block = args.loss_row_block
  if args.loss_kernel is not None:
    config.loss_kernel = args.loss_kernel
  info = machine_info()
  log(f"machine: {info['cpu']}, {info['cores']} cores, load {info['load_avg_start']}, jax "
      f"{info['jax']} on {info['jax_devices']}, torch {info['torch']}")

  # --- Data: the same batches for everybody.
  exp_fame = train_lib.Experiment.from_config(config)
  dataset = exp_fame.dataset
  packs = bool(config.data.get("packing", False))
  default_layout = "packed" if packs else "padded"
  exp_fame_padded = (exp_fame if not packs else train_lib.Experiment.from_config(
      with_overrides(config, **{"data.packing": False}), dataset))
  layouts = {default_layout: epoch_batches(exp_fame), "padded": epoch_batches(exp_fame_padded)}
  stats = {k: flops_lib.TokenStats.of_batches(v) for k, v in layouts.items()}
  padded_positions = {k: sum(b["items"].size for b in v) for k, v in layouts.items()}
  timed = {k: v[:args.max_steps] if args.max_steps > 0 else v for k, v in layouts.items()}
  if packs:  # Packing moves windows around; it must not change what the epoch asks for.
    a, b = stats["packed"], stats["padded"]
    assert (a.tokens_in, a.tokens_target, a.attended_pairs) == (
        b.tokens_in, b.tokens_target, b.attended_pairs), (a, b)
  valid = exp_fame.eval_data("valid")
  num_valid = len(valid.targets)
  if 0 < args.eval_users < num_valid:
    keep = np.unique(np.linspace(0, num_valid - 1, args.eval_users).round().astype(int))
    valid = data_lib.EvalData(valid.items[keep], valid.lengths[keep], valid.targets[keep],
                              valid.exclude[keep])
  eval_scale = num_valid / len(valid.targets)
  shapes = {k: {"x".join(map(str, s)): n for s, n in sorted(
      collections.Counter(b["items"].shape for b in v).items())} for k, v in layouts.items()}
  steps = len(layouts[default_layout])
  num_timed = len(timed[default_layout])
  log(f"{dataset.name}: {dataset.num_users} users, {dataset.num_items} items, "
      f"{stats[default_layout].tokens_target} targets, {steps} steps/epoch; batch shapes {shapes}; "
      f"timing {num_timed} steps, {len(valid.targets)}/{num_valid} validation users")
  results: dict[str, Any] = {
      "dataset": dataset.name, "num_users": dataset.num_users, "num_items": dataset.num_items,
      "batch_size": config.batch_size, "eval_batch_size": exp_fame.eval_batch_size,
      "fame_jax_layout": default_layout, "loss_chunk_size": exp_fame.loss_chunk_size,
      "loss_row_block": exp_fame.loss_row_block,
      "loss_kernel": "cpu_kernels.fused_nll" if exp_fame.fused_loss else "xla",
      "eval_user_block": exp_fame.eval_user_block, "batch_shapes": shapes, "steps_per_epoch": steps,
      "timed_steps": num_timed, "extrapolated": num_timed < steps,
      "epoch_tokens": {k: {**dataclasses.asdict(v), "padded_positions": padded_positions[k]}
                       for k, v in stats.items()},
      "eval_users": num_valid, "eval_users_timed": len(valid.targets), "machine": info,
      "rss_mb_after": {}, "runs": {}, "command": " ".join(["python"] + sys.argv), **caches,
  }
  results["rss_mb_after"]["setup"] = rss_mb()

  # --- The runs: fame-jax first, then PyTorch, each phase interleaved within itself.
  jax_runs: list[Run] = [JaxRun("fame", "fame-jax FAME", default_layout, exp_fame, True)]
  if not args.skip_sasrec:
    exp_sas = train_lib.Experiment.from_config(with_overrides(config, **{"model.name": "sasrec"}),
                                               dataset)
    jax_runs.append(JaxRun("sasrec", "fame-jax SASRec", default_layout, exp_sas, True))
  if packs and not args.skip_same_batches:
    jax_runs.append(JaxRun("fame_padded", "fame-jax FAME", "padded", exp_fame_padded, False))
  init_params = jax.device_get(jax_runs[0].state.params)  # The same initial FAME parameters.
  run_phase(jax_runs, layouts, timed, valid, args, results)

  # --- Matmul peak, after the fame-jax runs (measured again at the end, best kept): the
  # GFLOP-sized matrices leave the allocator in a state that slows the next ~30 fame-jax
  # steps by ~25% (a 2-core CPU measurement); no training run starts that way.
  sizes = [int(s) for s in args.matmul_sizes.split(",")]
  peak = matmul_peak(sizes, args.matmul_repeats)
  log(f"float32 matmul peak (jnp.dot): {peak['gflops']:.1f} GFLOP/s {peak['per_size_gflops']}")

  torch_runs: list[Run] = []
  if not args.skip_torch:
    # The checks: the longest padded batch, and a packed one (losses on the trained parameters).
    checks = {"padded": {k: v for k, v in max(
        layouts["padded"], key=lambda b: b["items"].shape[1] * 10 ** 6
        + int((b["targets"] > 0).sum())).items() if k in ("items", "targets")}}
    if packs:
      checks["packed"] = layouts["packed"][0]
    job = {"args": args, "cfg": exp_fame.model.cfg, "init_params": init_params,
           "trained_params": jax.device_get(jax_runs[0].state.params),  # Ranked with these.
           "lr": config.optim.learning_rate, "buckets": exp_fame.buckets,
           "eval_batch_size": exp_fame.eval_batch_size, "packs": packs,
           "device": args.torch_device or default_torch_device(), "layouts": layouts,
           "timed": timed, "valid": valid, "sizes": sizes, "checks": checks}
    out = run_torch_phase(job, args.torch_host_memory)
    torch_runs = [TorchRun.finished(r) for r in out.pop("runs")]
    results["rss_mb_after"].update(out.pop("rss_mb_after"))
    results["machine"].setdefault("load_avg_1min_during_epoch", []).extend(
        out.pop("load_avg_1min_during_epoch"))
    torch_losses = out.pop("losses")
    results.update(out)
  runs = jax_runs + torch_runs

  # The matmul peak again: a burst of load during the first measurement must not inflate the
  # fractions. The best of the two is the machine's peak.
  peak_end = matmul_peak(sizes, args.matmul_repeats)
  results["matmul_peak_start_gflops"] = peak["gflops"]
  results["matmul_peak_end_gflops"] = peak_end["gflops"]
  if peak_end["gflops"] > peak["gflops"]:
    peak = peak_end
  results["matmul_peak_gflops"] = peak["gflops"]
  results["matmul_peak_per_size_gflops"] = peak["per_size_gflops"]
  log(f"float32 matmul peak (jnp.dot) again: {peak_end['gflops']:.1f} GFLOP/s; using "
      f"{peak['gflops']:.1f}")

  # --- Results per run.
  fame_ranks = runs[0].eval_result[1]
  for run in runs:
    flops = flops_lib.train_flops(run.cfg, stats[run.layout])
    timed_s = sum(run.step_s)
    positions = sum(b["items"].size for b in timed[run.layout])
    scale = padded_positions[run.layout] / positions  # 1 unless --max_steps.
    epoch_blocked_s = timed_s * scale
    pipelined_s = run.pipelined_s
    epoch_s = min(pipelined_s) * scale if pipelined_s else epoch_blocked_s
    r = {"label": run.label, "layout": run.layout, "epoch_s": epoch_s,
         "epoch_timing": "pipelined" if pipelined_s else "blocked_steps",
         "epoch_blocked_s": epoch_blocked_s, "pipelined_epochs_s": pipelined_s, "timed_s": timed_s,
         "pipelined_minor_faults_per_step": run.faults_per_step,
         "timed_steps": len(run.step_s), "compile_s": run.compile_s, "warmup_s": run.warmup_s,
         "step_s_median": float(np.median(run.step_s)),
         "train_loss": run.loss_sum / max(run.num_targets, 1.0),
         "train_flops_per_epoch": flops, "achieved_gflops": flops["total"] / epoch_s / 1e9,
         "targets_per_s": stats[run.layout].tokens_target / epoch_s}
    r["matmul_peak_fraction"] = r["achieved_gflops"] / peak["gflops"]
    results[f"{run.key}_epoch_s"] = epoch_s
    results[f"{run.key}_epoch_blocked_s"] = epoch_blocked_s
    results[f"{run.key}_compile_s"] = run.compile_s
    if run.has_eval:
      metrics, ranks = run.eval_result
      r["eval_s"] = min(run.eval_s) * eval_scale if run.eval_s else None
      r["eval_passes_s"] = run.eval_s
      r["eval_passes_minor_faults"] = run.eval_faults
      r["eval_compile_s"] = max(0.0, run.eval_first_s - min(run.eval_s or [run.eval_first_s]))
      r["eval_batches_s"] = run.eval_batches_s * eval_scale
      r["valid_metrics"] = metrics
      if run.framework == "torch":
        r["eval_on_params_of"] = "fame-jax FAME after the timed epoch"
        r["eval_ranks_equal_to_fame_jax"] = float(np.mean(ranks == fame_ranks))
      results[f"{run.key}_eval_s"] = r["eval_s"]
      results[f"{run.key}_eval_compile_s"] = r["eval_compile_s"]
      results[f"{run.key}_eval_batches_s"] = r["eval_batches_s"]
      if r["eval_s"] is not None:
        results[f"{run.key}_eval_with_batches_s"] = r["eval_s"] + r["eval_batches_s"]
    results["runs"][run.key] = r
  results["matmul_peak_fraction"] = results["runs"]["fame"]["matmul_peak_fraction"]

  def ratio(name, num, den):
    if results.get(num) is not None and results.get(den):
      results[name] = results[num] / results[den]

  ratio("speedup_vs_torch_eager", "torch_eager_epoch_s", "fame_epoch_s")
  ratio("speedup_vs_torch_compile", "torch_compile_epoch_s", "fame_epoch_s")
  ratio("speedup_vs_torch_eager_same_batches", "torch_eager_packed_epoch_s", "fame_epoch_s")
  ratio("speedup_vs_torch_compile_same_batches", "torch_compile_packed_epoch_s", "fame_epoch_s")
  ratio("speedup_padded_batches_vs_torch_eager", "torch_eager_epoch_s", "fame_padded_epoch_s")
  ratio("packing_speedup", "fame_padded_epoch_s", "fame_epoch_s")
  ratio("eval_speedup_vs_torch", "torch_eager_eval_s", "fame_eval_s")
  ratio("eval_speedup_vs_torch_compile", "torch_compile_eval_s", "fame_eval_s")
  ratio("eval_speedup_vs_torch_with_batches", "torch_eager_eval_with_batches_s",
        "fame_eval_with_batches_s")
  for key in ("torch_eager_epoch_s", "torch_compile_epoch_s", "speedup_vs_torch_eager",
              "eval_speedup_vs_torch"):
    results.setdefault(key, None)

  # --- Parity on the trained parameters: the longest padded batch, and a packed one.
  if not args.skip_torch:
    results["parity"] = {}
    for name, batch in checks.items():
      ours, theirs = jax_loss(exp_fame, runs[0].state.params, batch), torch_losses[name]
      results["parity"][name] = {"jax_loss": ours, "torch_loss": theirs,
                                 "rel_diff": abs(ours - theirs) / abs(ours),
                                 "batch_shape": list(batch["items"].shape)}
    results["parity_max_rel_diff"] = max(p["rel_diff"] for p in results["parity"].values())

  results["peak_rss_mb"] = rss_mb()  # fame-jax's process (PyTorch's: torch_peak_rss_mb).
  # JAX's peak on its first device (GPU/TPU; None on CPU, where RSS above is the measure).
  results["peak_device_memory_mib"] = runtime.peak_device_memory_mib()
  results["keep_freed_host_memory"] = runtime.keep_freed_host_memory()  # In fame-jax's process.
  results["machine"]["load_avg_end"] = os.getloadavg()
  if not args.keep_compile_caches:
    shutil.rmtree(caches["torchinductor_cache_dir"], ignore_errors=True)
  print_table(results)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2, sort_keys=True, default=float)
    log(f"wrote {args.out}")
  return results


def print_table(r: dict[str, Any]) -> None:
  def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)

  ext = " (extrapolated from %d timed steps)" % r["timed_steps"] if r["extrapolated"] else ""
  m = r["machine"]
  print(f"\n{r['dataset']}: {r['steps_per_epoch']} steps/epoch{ext}, {r['eval_users']} validation "
        f"users; {m['device_kind']}, {m['cpu']}, {m['cores']} cores; load avg {m['load_avg_start'][0]:.1f} -> "
        f"{m['load_avg_end'][0]:.1f}")
  print(f"{'':20} {'batches':>7} {'epoch s':>8} {'blocked':>8} {'compile s':>9} {'eval s':>7} "
        f"{'ev.cmp s':>8} {'loss':>7} {'GFLOP/s':>8} {'of peak':>7}")
  for run in r["runs"].values():
    print(f"{run['label']:20} {run['layout']:>7} {fmt(run['epoch_s']):>8} "
          f"{fmt(run.get('epoch_blocked_s')):>8} "
          f"{fmt(run['compile_s'], '.1f'):>9} {fmt(run.get('eval_s')):>7} "
          f"{fmt(run.get('eval_compile_s'), '.1f'):>8} {fmt(run['train_loss'], '.4f'):>7} "
          f"{fmt(run['achieved_gflops'], '.1f'):>8} {fmt(100 * run['matmul_peak_fraction'], '.1f'):>6}%")
  print(f"matmul peak (jnp.dot f32): {r['matmul_peak_gflops']:.1f} GFLOP/s"
        + (f" (torch.mm: {r['torch_matmul_peak_gflops']:.1f})" if "torch_matmul_peak_gflops" in r
           else "")
        + f"; FAME real FLOPs/epoch {r['runs']['fame']['train_flops_per_epoch']['total'] / 1e12:.3f} T")
  faults = {k: v["pipelined_minor_faults_per_step"] for k, v in r["runs"].items()
            if v.get("pipelined_minor_faults_per_step")}
  if faults:
    print(f"fame-jax host memory {'kept' if r['keep_freed_host_memory'] else 'glibc default'}; "
          "minor page faults per step of the pipelined epochs: "
          + ", ".join(f"{k} {min(v):.0f}" for k, v in faults.items()))
  print("epoch s: fame-jax as its training loop runs (steps back to back, one sync; best of "
        "--pipelined_epochs), PyTorch the sum of its (synchronous) steps; blocked: the sum of "
        "the steps, each timed to completion, interleaved with the other runs")
  ratios = [("speedup_vs_torch_eager", "train vs torch eager (padded batches)"),
            ("speedup_vs_torch_compile", "train vs torch.compile (padded batches)"),
            ("speedup_vs_torch_eager_same_batches", "train vs torch eager on the same packed batches"),
            ("speedup_vs_torch_compile_same_batches", "train vs torch.compile on the same packed batches"),
            ("speedup_padded_batches_vs_torch_eager", "train, both on padded batches, vs torch eager"),
            ("packing_speedup", "packing vs padded batches (fame-jax FAME)"),
            ("eval_speedup_vs_torch", "eval vs torch eager"),
            ("eval_speedup_vs_torch_compile", "eval vs torch.compile")]
  for key, text in ratios:
    if r.get(key) is not None:
      print(f"  fame-jax speedup, {text}: {r[key]:.2f}x")
  for k, p in r.get("parity", {}).items():
    print(f"loss parity ({k} batch {p['batch_shape']}, same params, no dropout): jax "
          f"{p['jax_loss']:.6f} vs torch {p['torch_loss']:.6f}, rel diff {p['rel_diff']:.1e}")
  for run in r["runs"].values():
    if "eval_ranks_equal_to_fame_jax" in run:
      print(f"{run['label']}: evaluation ranks equal to fame-jax's (same params) for "
            f"{100 * run['eval_ranks_equal_to_fame_jax']:.2f}% of users")
  if r.get("peak_device_memory_mib") is not None:
    print(f"peak device memory (JAX) {r['peak_device_memory_mib']:.0f} MiB")
  after = r["rss_mb_after"]
  print(f"peak RSS, fame-jax's process: {r['peak_rss_mb']:.0f} MiB (after: "
        + ", ".join(f"{k} {v:.0f}" for k, v in after.items() if "torch" not in k) + ")")
  if r.get("torch_peak_rss_mb") is not None:
    print(f"peak RSS, PyTorch's process (host memory {r['torch_host_memory']}): "
          f"{r['torch_peak_rss_mb']:.0f} MiB (after: "
          + ", ".join(f"{k} {v:.0f}" for k, v in after.items() if "torch" in k) + ")")


if __name__ == "__main__":
  main()
