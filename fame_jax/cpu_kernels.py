"""FAME's training output layer as one hand-written CPU kernel (`kernels/fused_nll.c`).

`fused_nll` computes what `scoring._row_blocked_nll` computes (the summed
next-item cross-entropy of the mixture rule and, in the same pass, its
gradients), for user vectors of 32 dimensions on an x86 CPU with AVX-512. XLA:CPU
runs that loss as a matmul kernel, an exp kernel and two more matmul kernels that
pass the logits through memory; the kernel keeps each block's logits in one
core's L2 from the matmul to both gradients (Beauty's output layer: ~33 against
~48 ms a step on 2 cores; benchmarks/README.md).

The kernel is compiled with the system's C compiler ($CC, else gcc or cc) on first
use, for this machine's CPU, into $FAME_JAX_KERNEL_DIR (default
~/.cache/fame_jax/kernels, one file per source and CPU), and called from the jitted
step with `jax.pure_callback`. Where it cannot be built `available()` is False
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

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "fused_nll.c")
VECTOR_SIZE = 32  # The one user-vector size the kernel is written for (D = d / H).
ROW_BLOCK = 32  # Positions a block; callers' positions are padded to a multiple of it.
MAX_VECTORS = 16  # K: one thread a head.
FLAGS = ("-O3", "-march=native", "-funroll-loops", "-shared", "-fPIC", "-pthread")


def applies(num_vectors: int, vector_size: int, dtype) -> bool:
  """Whether the kernel computes this loss: K <= 16 vectors of 32 float32 dimensions."""
  return (vector_size == VECTOR_SIZE and 1 <= num_vectors <= MAX_VECTORS
          and jnp.dtype(dtype) == jnp.float32)


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
  """The built kernel, loaded; None where there is no AVX-512, no compiler or no build."""
  cpu = _cpu_description()
  compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
  if cpu is None or compiler is None:
    logging.warning("cpu_kernels: %s; the training loss runs in XLA",
                    "no AVX-512 CPU" if cpu is None else "no C compiler ($CC, gcc, cc)")
    return None
  with open(SOURCE, "rb") as f:
    source = f.read()
  key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(),
                                   cpu.encode()])).hexdigest()[:16]
  directory = os.environ.get("FAME_JAX_KERNEL_DIR",
                             os.path.expanduser("~/.cache/fame_jax/kernels"))
  path = os.path.join(directory, f"fused_nll_{key}.so")
  try:
    if not os.path.exists(path):
      os.makedirs(directory, exist_ok=True)
      partial = f"{path}.{os.getpid()}.tmp"  # Renamed when complete: never a half file.
      done = subprocess.run([compiler, *FLAGS, SOURCE, "-o", partial, "-lm"],
                            capture_output=True, text=True, check=False)
      if done.returncode != 0:
        logging.warning("cpu_kernels: %s failed to build %s (%s); the training loss runs in "
                        "XLA", compiler, SOURCE, (done.stderr.strip().splitlines() or ["?"])[-1])
        return None
      os.replace(partial, path)
    library = ctypes.CDLL(path)
  except OSError as e:
    logging.warning("cpu_kernels: cannot build or load %s (%s); the training loss runs in XLA",
                    path, e)
    return None
  floats = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
  library.fame_fused_nll.restype = ctypes.c_int
  library.fame_fused_nll.argtypes = [
      ctypes.c_int, ctypes.c_int, ctypes.c_int, floats, floats,
      np.ctypeslib.ndpointer(np.int32, flags="C_CONTIGUOUS"), floats,
      np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS"), floats, floats, floats]
  return library


def fused_nll(vectors: Array, log_weights: Array, targets: Array, tables: Array) -> Array:
  """Summed -log p(target) over the positions with a target, as `scoring.next_item_nll`.

  vectors `[T, K, 32]`, log_weights `[T, K]`, targets `[T]` (item ids, 0 = none),
  tables `[K, V, 32]` (row i is item i + 1). Differentiable in vectors,
  log_weights and tables; the gradients come from the forward pass.
  """
  chex.assert_rank([vectors, log_weights, targets, tables], [3, 2, 1, 3])
  num, k, dim = vectors.shape
  chex.assert_shape(tables, (k, None, dim))
  if not applies(k, dim, vectors.dtype):
    raise ValueError(f"cpu_kernels.fused_nll: K={k} vectors of D={dim} ({vectors.dtype}); "
                     f"the kernel takes K <= {MAX_VECTORS} float32 vectors of {VECTOR_SIZE}")
  pad = -num % ROW_BLOCK
  u = jnp.pad(vectors, [(0, pad), (0, 0), (0, 0)]).transpose(1, 0, 2)  # [K, R, D]
  w = jnp.pad(log_weights.astype(jnp.float32), [(0, pad), (0, 0)])
  t = jnp.pad(targets.astype(jnp.int32) - 1, (0, pad), constant_values=-1)  # -1: no target
  return _nll(u, w, t, tables.astype(jnp.float32))


@jax.custom_vjp
def _nll(u: Array, log_weights: Array, targets: Array, tables: Array) -> Array:
  return _kernel_call(u, log_weights, targets, tables)[0]


def _nll_fwd(u, log_weights, targets, tables):
  loss, du, d_tables, d_log_weights = _kernel_call(u, log_weights, targets, tables)
  return loss, (du, d_log_weights, d_tables)


def _nll_bwd(grads, cotangent):
  du, d_log_weights, d_tables = grads
  return cotangent * du, cotangent * d_log_weights, None, cotangent * d_tables


_nll.defvjp(_nll_fwd, _nll_bwd)


def _kernel_call(u: Array, log_weights: Array, targets: Array, tables: Array):
  """(loss, du, d_tables, d_log_weights) from the kernel, through a host callback."""
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.pure_callback(_run_kernel, (f32(()), f32(u.shape), f32(tables.shape),
                                         f32(log_weights.shape)),
                           u, log_weights, targets, tables, vmap_method="sequential")


def _run_kernel(u, log_weights, targets, tables):
  library = _library()
  if library is None:  # Callers check `available()` first.
    raise RuntimeError("cpu_kernels: the fused loss kernel is not available on this machine")
  u = np.ascontiguousarray(u, np.float32)
  log_weights = np.ascontiguousarray(log_weights, np.float32)
  targets = np.ascontiguousarray(targets, np.int32)
  tables = np.ascontiguousarray(tables, np.float32)
  k, rows, _ = u.shape
  loss = np.zeros(1, np.float64)
  du, d_tables, d_log_weights = (np.empty_like(x) for x in (u, tables, log_weights))
  error = library.fame_fused_nll(k, rows, tables.shape[1], u, log_weights, targets, tables,
                                 loss, du, d_tables, d_log_weights)
  if error:
    raise RuntimeError(f"cpu_kernels: fame_fused_nll failed ({os.strerror(error)})")
  return np.float32(loss[0]), du, d_tables, d_log_weights
