"""FAME's training output layer as one hand-written CPU kernel (`kernels/fused_nll.c`).

`fused_nll` computes what `model.item_tables` and `scoring._row_blocked_nll`
compute (the per-head item tables of Eq. 9, the summed next-item cross-entropy
of the mixture rule and, in the same pass, its gradients), for user vectors of
32 dimensions on an x86 CPU with AVX-512. XLA:CPU runs that loss as a matmul
kernel, an exp kernel and two more matmul kernels that pass the logits through
memory; the kernel makes the logits, their exps and the user vectors' gradient
in one sweep over the table, with the logits in registers (benchmarks/README.md,
"The training loss as one CPU kernel").

The kernel is compiled on first use, for this machine's CPU, with the system's C
and C++ compilers ($CC and $CXX, else gcc and g++), with an XLA FFI handler
(`kernels/fused_nll_ffi.cc`, against the headers of the installed jaxlib), into
$FAME_JAX_KERNEL_DIR (default ~/.cache/fame_jax/kernels; one file per source,
jaxlib and CPU). The jitted step calls it as an XLA custom call on its own
buffers (`jax.ffi.ffi_call`). Where it cannot be built `available()` is False
(with one logged warning) and training uses the XLA loss.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

Array = jax.Array

_KERNELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
SOURCE = os.path.join(_KERNELS, "fused_nll.c")
FFI_SOURCE = os.path.join(_KERNELS, "fused_nll_ffi.cc")
TARGET = "fame_fused_nll"  # The XLA custom-call target.
VECTOR_SIZE = 32  # The one user-vector size the kernel is written for (D = d / H).
ROW_BLOCK = 32  # Positions a block; callers' positions are padded to a multiple of it.
MAX_VECTORS = 16  # K: one thread a head in each group of threads.
MAX_THREADS = 64  # K x groups.
# Each group past the first adds K x V x (32 + 32) floats (its exps and its share of
# T's gradient); the default number of groups keeps them within this many bytes.
EXTRA_GROUPS_MEMORY = 1 << 30
C_FLAGS = ("-O3", "-march=native", "-funroll-loops", "-fPIC", "-pthread")
CXX_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-w")


def applies(num_vectors: int, vector_size: int, dtype) -> bool:
  """Whether the kernel computes this loss: K <= 16 vectors of 32 float32 dimensions."""
  return (vector_size == VECTOR_SIZE and 1 <= num_vectors <= MAX_VECTORS
          and jnp.dtype(dtype) == jnp.float32)


def cores(sysfs: str = "/sys/devices/system/cpu") -> int:
  """The physical cores this process may run on: hardware threads of one core (SMT
  siblings, as Linux lists them) count once, since the kernel's threads are bound by a
  core's FMA units. The number of CPUs it may run on where the topology is unknown."""
  try:
    allowed = os.sched_getaffinity(0)
  except AttributeError:  # Not Linux.
    return os.cpu_count() or 1
  siblings = set()
  for cpu in allowed:
    try:
      with open(os.path.join(sysfs, f"cpu{cpu}", "topology", "thread_siblings_list")) as f:
        siblings.add(f.read().strip())
    except OSError:
      return len(allowed)
  return max(1, len(siblings))


def default_groups(num_vectors: int, num_items: int = 0) -> int:
  """Groups of `num_vectors` threads (one a head) for this machine: as many as there are
  physical cores for (K = 2 on 2 cores: 1 group; on 16 cores: 8), at least one, and no
  more than `EXTRA_GROUPS_MEMORY` holds for a catalogue of `num_items` (a million items
  and K = 2: 3 groups)."""
  groups = max(1, min(cores(), MAX_THREADS) // num_vectors)
  per_group = 4 * num_vectors * -(-num_items // 8) * 8 * (VECTOR_SIZE + ROW_BLOCK)
  return min(groups, 1 + EXTRA_GROUPS_MEMORY // per_group) if per_group else groups


def available() -> bool:
  """Whether the kernel runs on this machine (builds it on the first call)."""
  return _library() is not None


def _cpu_description() -> str | None:
  """The CPU's model and feature flags (Linux), or None without AVX-512."""
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return None
  try:
    with open("/proc/cpuinfo") as f:
      lines = [l for l in f if l.startswith(("model name", "flags"))][:2]
  except OSError:
    return None
  flags = lines[-1].split() if lines else []
  return "".join(lines) if "avx512f" in flags else None


@functools.cache
def _library() -> ctypes.CDLL | None:
  """The built kernel, loaded and registered with XLA; None where there is no AVX-512,
  no compiler or no build (one warning)."""
  cpu = _cpu_description()
  cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
  cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if cpu is None or cc is None or cxx is None:
    logging.warning("cpu_kernels: %s; the training loss runs in XLA",
                    "no AVX-512 CPU" if cpu is None else "no C and C++ compilers ($CC, $CXX)")
    return None
  sources = []
  for path in (SOURCE, FFI_SOURCE):
    with open(path, "rb") as f:
      sources.append(f.read())
  key = hashlib.sha256(b"\0".join([*sources, " ".join(C_FLAGS + CXX_FLAGS).encode(),
                                   cc.encode(), cxx.encode(), jax.__version__.encode(),
                                   cpu.encode()])).hexdigest()[:16]
  directory = os.environ.get("FAME_JAX_KERNEL_DIR",
                             os.path.expanduser("~/.cache/fame_jax/kernels"))
  path = os.path.join(directory, f"fused_nll_{key}.so")
  try:
    if not os.path.exists(path):
      os.makedirs(directory, exist_ok=True)
      partial = f"{path}.{os.getpid()}"  # Renamed when complete: never a half-built file.
      steps = [[cc, *C_FLAGS, "-c", SOURCE, "-o", f"{partial}.o"],
               [cxx, *CXX_FLAGS, "-shared", f"-I{jax.ffi.include_dir()}", FFI_SOURCE,
                f"{partial}.o", "-o", f"{partial}.so", "-pthread", "-lm"]]
      for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
          logging.warning("cpu_kernels: building %s failed (%s); the training loss runs in "
                          "XLA", path, (done.stderr.strip().splitlines() or ["?"])[-1])
          return None
      os.replace(f"{partial}.so", path)
      os.remove(f"{partial}.o")
    library = ctypes.CDLL(path)
  except OSError as e:
    logging.warning("cpu_kernels: cannot build or load %s (%s); the training loss runs in XLA",
                    path, e)
    return None
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.FameFusedNll), platform="cpu")
  return library


def fused_nll(vectors: Array, log_weights: Array, targets: Array, embedding: Array,
              projection: Array, num_items: int, groups: int | None = None) -> Array:
  """Summed -log p(target) over the positions with a target, as `scoring.next_item_nll`
  against `model.item_tables`.

  vectors `[T, K, 32]`, log_weights `[T, K]`, targets `[T]` (item ids, 0 = none),
  embedding `[rows, d]` (the item table E: row 0 padding, row i item i, rows past
  `num_items` unused), projection `[K, d, 32]` (W_f, Eq. 9: head k scores against
  E W_f^(k)). Differentiable in vectors, log_weights, embedding and projection; the
  gradients come from the forward pass. The kernel runs `groups` groups of K threads,
  each group a share of the positions (default: `default_groups(K, num_items)`); the
  result depends on `groups` only through the order of float32 sums.
  """
  chex.assert_rank([vectors, log_weights, targets, embedding, projection], [3, 2, 1, 2, 3])
  num, k, dim = vectors.shape
  rows, width = embedding.shape
  chex.assert_shape(projection, (k, width, dim))
  if not applies(k, dim, vectors.dtype) or width % VECTOR_SIZE or rows <= num_items:
    raise ValueError(f"cpu_kernels.fused_nll: K={k} vectors of D={dim} ({vectors.dtype}), an "
                     f"embedding [{rows}, {width}] for {num_items} items; the kernel takes K <= "
                     f"{MAX_VECTORS} float32 vectors of {VECTOR_SIZE}, an embedding width that "
                     f"is a multiple of {VECTOR_SIZE} and a row for each item after row 0")
  groups = default_groups(k, num_items) if groups is None else groups
  if not 1 <= groups * k <= MAX_THREADS:
    raise ValueError(f"cpu_kernels.fused_nll: groups={groups} of K={k} threads; at most "
                     f"{MAX_THREADS} threads in all")
  pad = -num % ROW_BLOCK
  u = jnp.pad(vectors, [(0, pad), (0, 0), (0, 0)]).transpose(1, 0, 2)  # [K, R, D]
  w = jnp.pad(log_weights.astype(jnp.float32), [(0, pad), (0, 0)])
  t = jnp.pad(targets.astype(jnp.int32) - 1, (0, pad), constant_values=-1)  # -1: no target
  return _nll(u, w, t, embedding.astype(jnp.float32), projection.astype(jnp.float32),
              num_items, groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _nll(u: Array, log_weights: Array, targets: Array, embedding: Array, projection: Array,
         num_items: int, groups: int) -> Array:
  return _kernel_call(u, log_weights, targets, embedding, projection, num_items, groups)[0]


def _nll_fwd(u, log_weights, targets, embedding, projection, num_items, groups):
  loss, *grads = _kernel_call(u, log_weights, targets, embedding, projection, num_items,
                              groups)
  return loss, tuple(grads)


def _nll_bwd(num_items, groups, grads, cotangent):
  del num_items, groups
  du, d_embedding, d_projection, d_log_weights = grads
  return (cotangent * du, cotangent * d_log_weights, None, cotangent * d_embedding,
          cotangent * d_projection)


_nll.defvjp(_nll_fwd, _nll_bwd)


def _kernel_call(u: Array, log_weights: Array, targets: Array, embedding: Array,
                 projection: Array, num_items: int, groups: int):
  """(loss, du, d_embedding, d_projection, d_log_weights) from the kernel, an XLA
  custom call."""
  if _library() is None:  # Callers check `available()` first.
    raise RuntimeError("cpu_kernels: the fused loss kernel is not available on this machine")
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  call = jax.ffi.ffi_call(TARGET, (f32(()), f32(u.shape), f32(embedding.shape),
                                   f32(projection.shape), f32(log_weights.shape)),
                          vmap_method="sequential")
  return call(u, log_weights, targets, embedding, projection, num_items=np.int64(num_items),
              groups=np.int64(groups))
