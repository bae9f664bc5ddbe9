"""Process set-up: logging, the XLA compilation cache, multi-process start, CPU tuning."""

import ctypes
import functools
import importlib.metadata
import logging as py_logging
import os
import sys
from typing import Callable

import jax
import numpy as np
from absl import logging
from jax import lax
from jax.extend import random as jex_random
from jax.interpreters import mlir


class _OwnInfoOnly(py_logging.Filter):
  """Passes records from fame_jax and the entry points, and any library warning."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    path = record.pathname.replace("\\", "/")
    return "/fame_jax/" in path or path.endswith(("/train.py", "/eval.py"))


def setup_logging() -> None:
  """Our INFO lines, and only warnings from libraries (Orbax logs every file it writes)."""
  logging.set_verbosity(logging.INFO)
  py_logging.getLogger().addFilter(_OwnInfoOnly())
  logging.get_absl_handler().addFilter(_OwnInfoOnly())


def enable_compilation_cache() -> None:
  """Keeps compiled XLA programs on disk, so a resumed or repeated run starts at once.

  The directory is $FAME_JAX_CACHE_DIR, default ~/.cache/fame_jax/xla; set it to
  an empty string to turn the cache off. JAX_COMPILATION_CACHE_DIR, if set, wins.
  """
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # JAX's own setting wins.
    return
  path = os.environ.get("FAME_JAX_CACHE_DIR", os.path.expanduser("~/.cache/fame_jax/xla"))
  if path:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def request_deterministic_ops(enabled: bool = True) -> bool:
  """Adds `DETERMINISTIC_FLAG` to $XLA_FLAGS unless it names the option already.

  On a GPU, XLA sums the gradient of an embedding lookup (a scatter-add) with
  atomics in whatever order threads arrive, so two runs of one config and seed
  drift apart: on an H200, two Beauty runs stopped at epochs 85 and 86 with
  test NDCG@10 0.0448 and 0.0465. With the flag both runs gave the same numbers
  in every epoch, for a ~35% longer training epoch (0.23 vs 0.17 s; the whole
  run 35.6 vs 30.5 s with compiled programs cached, benchmarks/README.md). It
  is a GPU option; CPU runs reproduce bit for bit without it (the tests
  compare them). Call it before JAX starts its backend (XLA reads $XLA_FLAGS once); the entry
  points do, from `config.deterministic`. Returns whether the flag is in effect.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if enabled and "xla_gpu_deterministic_ops" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_FLAG}".strip()
  return deterministic_ops_on()


def deterministic_ops_on() -> bool:
  """Whether $XLA_FLAGS holds `DETERMINISTIC_FLAG`."""
  return DETERMINISTIC_FLAG in os.environ.get("XLA_FLAGS", "").split()


def _threefry2x32_unrolled(key1, key2, x1, x2):
  """Threefry-2x32, 20 rounds written out: the function JAX lowers to on GPU and TPU."""
  rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
  ks = (key1, key2, key1 ^ key2 ^ np.uint32(0x1BD11BDA))
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for i in range(5):
    for r in rotations[i % 2]:
      x1 = x1 + x2
      x2 = x1 ^ (lax.shift_left(x2, np.uint32(r)) | lax.shift_right_logical(x2, np.uint32(32 - r)))
    x1 = x1 + ks[(i + 1) % 3]
    x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


@functools.cache
def unroll_threefry_on_cpu() -> None:
  """Lowers JAX's threefry PRNG on CPU without its rolled loop: the same bits, faster.

  On CPU, JAX lowers threefry-2x32 to a 5-iteration XLA while loop (smaller
  programs); every dropout mask of a training step then makes 5 passes over its
  `[tokens, ...]` counters, each a handful of unfused ops. Written out, XLA
  fuses the 20 rounds into one pass: the same random bits (tests/test_runtime.py
  checks them against the published test vectors), ~4% off a Beauty training
  step on 2 CPU cores and a shorter compile. Runs once per process; GPU and TPU
  lowerings are left alone.
  """
  mlir.register_lowering(jex_random.threefry2x32_p,
                         mlir.lower_fun(_threefry2x32_unrolled, multiple_results=True),
                         platform="cpu")


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# What keep_freed_host_memory sets: two arenas, no mmap, the heap trimmed only past 2 GiB,
# and 64 MiB of top pad, which also keeps a thread arena's extra heaps once emptied.
_MALLOC_SETTINGS = ((_M_ARENA_MAX, 2), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1),
                    (_M_TOP_PAD, 64 * 2**20))
# Distributions that give JAX a GPU or TPU backend.
_ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")


def _cpu_only() -> bool:
  """Whether JAX in this process will run on the CPU (decided without starting a backend)."""
  platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  names = (dist.metadata["Name"] or "" for dist in importlib.metadata.distributions())
  return not any(name.lower().startswith(_ACCELERATOR_PLUGINS) for name in names)


@functools.cache
def keep_freed_host_memory() -> bool:
  """On CPU, makes glibc's malloc reuse freed memory instead of handing it back to the OS.

  XLA:CPU allocates a program's temporaries with malloc at every execution (a
  Beauty training step: one 62 MB block). glibc serves blocks above 32 MB with
  a fresh mmap and unmaps them on free, so every step page-faulted its whole
  temporary buffer in again: ~15,200 faults per Beauty step, the kernel zeroing
  each page. Here mmap is off, the heap is trimmed only past 2 GiB, and threads
  share two arenas (so that the few heaps grow to the high-water mark once):
  0 faults per step, and the Beauty FAME epoch 9-13% shorter on 2 cores
  (benchmarks/README.md, "Host memory"). The second arena grows by 64 MiB
  heaps and unmaps a heap other than its first as soon as it is empty, whatever
  the trim threshold, so a pass whose blocks spilled into a new heap faulted it
  in again at every call (up to 197,000 faults in a Beauty evaluation pass);
  64 MiB of top pad makes glibc keep such heaps. Limits: a block above 64 MiB
  taken in the second arena (a heap's cap) is still mapped afresh (every
  default config's training step stays under it); and the
  process keeps its high-water mark of host memory until it exits. Call it
  before JAX starts its backend (threads that already hold an arena keep it;
  the entry points call it first). Runs once per process; returns whether it
  applied: not on GPU/TPU hosts (`JAX_PLATFORMS`, or an accelerator plugin
  installed), nor where the C library is not glibc, nor when the environment
  sets FAME_JAX_KEEP_FREED_MEMORY=0.
  """
  if os.environ.get("FAME_JAX_KEEP_FREED_MEMORY", "1") == "0":
    return False
  if not sys.platform.startswith("linux") or not _cpu_only():
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # musl has a mallopt that does nothing and returns 0; glibc returns 1 on success.
  return all(mallopt(param, value) == 1 for param, value in _MALLOC_SETTINGS)


def compiler_options() -> dict[str, int] | None:
  """XLA options for fame-jax's jitted programs: on CPU, LLVM may use 512-bit vectors.

  XLA:CPU asks LLVM to prefer 256-bit vectors even on AVX-512 CPUs; the
  elementwise fusions it writes itself (the exps of the catalogue softmax
  above all) then run at half the width. 512 makes a Beauty FAME training step
  ~10% shorter on 2 AVX-512 cores (benchmarks/README.md); on CPUs without
  AVX-512 LLVM keeps the widest it has. $FAME_JAX_CPU_VECTOR_WIDTH sets the
  width (e.g. 256; 0 = XLA's default). None (nothing to set) on GPU/TPU.
  """
  if jax.default_backend() != "cpu":
    return None
  width = int(os.environ.get("FAME_JAX_CPU_VECTOR_WIDTH", "512") or 0)
  return {"xla_cpu_prefer_vector_width": width} if width else None


def peak_device_memory_mib() -> float | None:
  """Peak bytes in use on this process's first device, MiB (None where not reported, e.g. CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**20


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """Starts JAX's multi-controller runtime when the run spans several processes.

  Explicit flags win; otherwise `jax.distributed.initialize()` is called when
  the environment describes a cluster it can detect on its own (SLURM, Open MPI,
  Cloud TPU, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).
  On CPU, cross-process collectives use gloo.
  """
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  from_env = any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS",
                                           "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"))
  if not explicit and not from_env:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # Only affects CPU devices.
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()


def exit_on_user_error(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """Wraps an absl main: bad config, data or checkpoint exits with one line, not a traceback."""
  from fame_jax import checkpointing, data, model, train_lib  # pylint: disable=g-import-not-at-top
  user_errors = (model.ConfigError, data.DataError, checkpointing.CheckpointError,
                 train_lib.NonFiniteLossError)

  def wrapped(argv: list[str]) -> None:
    try:
      main(argv)
    except user_errors as e:
      sys.exit(f"error: {e}")

  return wrapped
