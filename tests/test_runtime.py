"""fame_jax.runtime: threefry on CPU lowered without its loop draws the very same bits;
freed host memory is reused, so a program's big temporaries stop page-faulting."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import random as jex_random

from configs import default
from fame_jax import runtime
from fame_jax import scoring
from fame_jax import sharding as sharding_lib
from fame_jax import train_lib

# Threefry-2x32 with 20 rounds: (key, counter) -> output, the known-answer vectors published
# with Random123 (Salmon et al., SC 2011).
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]

# What the test draws, in a process that does (argv "unrolled") or does not lower threefry
# without its loop: raw bits, a uniform draw and a dropout-style Bernoulli mask.
DRAWS = """
import sys
import jax, numpy as np
from fame_jax import runtime
if sys.argv[1] == "unrolled":
  runtime.unroll_threefry_on_cpu()
key = jax.random.key(7)
draw = jax.jit(lambda k: (jax.random.bits(k, (257, 33)),
                          jax.random.uniform(jax.random.fold_in(k, 1), (31, 50, 64)),
                          jax.random.bernoulli(jax.random.fold_in(k, 2), 0.5, (2, 31, 50, 4, 50))))
np.savez(sys.argv[2], *[np.asarray(x) for x in draw(key)])
"""


# Runs a program with a 48 MiB temporary (above the 32 MiB past which glibc always maps a
# block afresh, within its 64 MiB per-thread heaps) until the heap stops growing, then
# 5 x 3 more times, in a process that does (argv "keep") or does not keep freed host
# memory; prints whether it applied, the temporary's size and the fewest minor page faults
# of 3 consecutive runs.
PAGE_FAULTS = """
import resource, sys
from fame_jax import runtime
applied = runtime.keep_freed_host_memory() if sys.argv[1] == "keep" else False
import jax, jax.numpy as jnp
a, b = jnp.ones((4096, 64)), jnp.ones((64, 3072))
def f(a, b):
  y = a @ b  # [4096, 3072] float32, read by two reductions: a materialised temporary.
  return y.max(axis=0).sum() + y.min(axis=1).sum()
step = jax.jit(f).lower(a, b).compile()
for _ in range(20):  # Until the heap has grown to its high-water mark.
  step(a, b).block_until_ready()
windows = []
for _ in range(5):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(3):
    step(a, b).block_until_ready()
  windows.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, step.memory_analysis().temp_size_in_bytes, min(windows))
"""


# In a thread served by glibc's second arena, allocates two 40 MiB blocks (more than one
# of the arena's 64 MiB heaps holds, so the second opens a new heap), touches and frees
# them, 5 times; with runtime's malloc settings ("keep") or the same without the top pad.
# Prints whether they applied, whether a thread landed on the second arena, and the fewest
# minor page faults of the last 4 rounds.
HEAP_CHURN = """
import ctypes, resource, sys, threading
from fame_jax import runtime
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes, libc.sbrk.restype, libc.sbrk.argtypes = (ctypes.c_void_p,), ctypes.c_void_p, (ctypes.c_ssize_t,)
libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
if sys.argv[1] == "keep":
  applied = runtime.keep_freed_host_memory()
else:
  applied = all(libc.mallopt(p, v) == 1 for p, v in runtime._MALLOC_SETTINGS
                if p != runtime._M_TOP_PAD)
block, rounds = 40 * 2**20, []
def work():
  probe = libc.malloc(64)
  libc.free(probe)
  if probe < libc.sbrk(0):  # Below the program break: the main arena. Try another thread.
    return
  for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    a = libc.malloc(block); ctypes.memset(a, 1, block)
    b = libc.malloc(block); ctypes.memset(b, 1, block)
    libc.free(b); libc.free(a)
    rounds.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
for _ in range(6):
  if not rounds:
    thread = threading.Thread(target=work); thread.start(); thread.join()
print(applied, bool(rounds), min(rounds[1:]) if rounds else -1)
"""


@pytest.fixture(scope="module", autouse=True)
def unrolled_threefry():
  runtime.unroll_threefry_on_cpu()


def test_unrolled_threefry_gives_the_published_known_answers():
  threefry = jax.jit(lambda key, count: jex_random.threefry_2x32(key, count))
  for key, count, expected in KNOWN_ANSWERS:
    got = threefry(np.array(key, np.uint32), np.array(count, np.uint32))
    np.testing.assert_array_equal(np.asarray(got), np.array(expected, np.uint32))


def test_random_draws_equal_those_of_jax_own_cpu_lowering(tmp_path):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
  files = {}
  for mode in ("rolled", "unrolled"):
    files[mode] = str(tmp_path / f"{mode}.npz")
    subprocess.run([sys.executable, "-c", DRAWS, mode, files[mode]], check=True, env=env,
                   timeout=300)
  rolled, unrolled = np.load(files["rolled"]), np.load(files["unrolled"])
  assert len(rolled.files) == 3
  for name in rolled.files:
    np.testing.assert_array_equal(unrolled[name], rolled[name])


def test_random_bits_on_cpu_compile_without_a_loop():
  draw = jax.jit(lambda k: jax.random.bernoulli(k, 0.5, (31, 50, 64)))
  assert " while(" not in draw.lower(jax.random.key(0)).compile().as_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_a_thread_arena_keeps_the_heaps_it_has_emptied():
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu"}
  results = {}
  for mode in ("keep", "no_top_pad"):
    out = subprocess.run([sys.executable, "-c", HEAP_CHURN, mode], check=True, timeout=120,
                         env=env, capture_output=True, text=True).stdout.split()
    results[mode] = (out[-3] == "True", out[-2] == "True", int(out[-1]))
  if not results["keep"][0]:
    pytest.skip("the C library is not glibc")
  assert results["keep"][1] and results["no_top_pad"][1], results
  pages = 40 * 2**20 // 4096
  # Without the top pad the emptied second heap is unmapped and faulted in again each round.
  assert results["no_top_pad"][2] > pages // 2, results
  assert results["keep"][2] < pages // 100, results


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_kept_host_memory_makes_big_temporaries_stop_page_faulting():
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu"}
  env["XLA_FLAGS"] = ""  # One CPU device, as train.py on a plain machine.
  results = {}
  for mode, switch in (("default", "1"), ("keep", "1"), ("keep", "0")):
    out = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], check=True, timeout=300,
                         env={**env, "FAME_JAX_KEEP_FREED_MEMORY": switch},
                         capture_output=True, text=True).stdout.split()
    results[mode, switch] = (out[-3] == "True", int(out[-2]), int(out[-1]))
  _, temp_bytes, default_faults = results["default", "1"]
  if not results["keep", "1"][0]:
    pytest.skip("the C library is not glibc")
  pages = 3 * temp_bytes // 4096  # Three runs.
  assert 32 * 2**20 < temp_bytes < 64 * 2**20
  # Without it every run maps its temporary afresh; with it the heap's pages are reused.
  assert default_faults > pages // 2, results
  assert results["keep", "1"][2] < pages // 20, results
  # FAME_JAX_KEEP_FREED_MEMORY=0 leaves malloc alone.
  assert not results["keep", "0"][0] and results["keep", "0"][2] > pages // 2, results


def test_a_yelp_sized_fame_training_step_fits_in_one_glibc_thread_heap():
  """Yelp's default FAME step (V = 20,033, 40 packed rows of 50, row blocks of 96) keeps its
  temporaries under the 64 MiB one heap of a glibc thread arena holds: a larger block taken
  there is mapped afresh and page-faulted in at every step, whatever the malloc settings."""
  config = default.get_config()
  config.data.name = "synthetic"
  config.data.synthetic.num_items = 20_033
  # What -1 resolves to for Yelp's 2,000 positions a step (96): set here, as the synthetic
  # data's own batches have another number of rows.
  config.loss_row_block = scoring.auto_row_block("cpu", 40 * 50, 2, 20_033)
  experiment = train_lib.Experiment.from_config(config, devices=jax.devices()[:1])
  sharding = sharding_lib.stacked_batch_sharding(experiment.mesh)
  batch = {name: jax.ShapeDtypeStruct((1, 40, 50), jnp.int32, sharding=sharding)
           for name in ("items", "positions", "segments", "targets")}
  step = experiment.jit_train_steps().lower(experiment.init_state(), batch,
                                            jax.random.key(0)).compile()
  assert step.memory_analysis().temp_size_in_bytes < 64 * 2**20


def test_cpu_programs_ask_for_512_bit_vectors_unless_the_environment_says_otherwise(monkeypatch):
  monkeypatch.delenv("FAME_JAX_CPU_VECTOR_WIDTH", raising=False)
  assert jax.default_backend() == "cpu"
  assert runtime.compiler_options() == {"xla_cpu_prefer_vector_width": 512}
  monkeypatch.setenv("FAME_JAX_CPU_VECTOR_WIDTH", "256")
  assert runtime.compiler_options() == {"xla_cpu_prefer_vector_width": 256}
  monkeypatch.setenv("FAME_JAX_CPU_VECTOR_WIDTH", "0")
  assert runtime.compiler_options() is None
  # XLA accepts the option: a program compiled with it computes what one without it does.
  x = jnp.linspace(-3.0, 3.0, 4096)
  monkeypatch.setenv("FAME_JAX_CPU_VECTOR_WIDTH", "512")
  wide = jax.jit(lambda x: jnp.exp(x) * 2.0, compiler_options=runtime.compiler_options())(x)
  np.testing.assert_allclose(wide, np.exp(np.asarray(x, np.float64)) * 2.0, rtol=1e-6)


def test_deterministic_ops_flag_is_added_once_and_never_overrides_the_user(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  assert runtime.request_deterministic_ops(True)
  assert os.environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=2 "
                                     "--xla_gpu_deterministic_ops=true")
  assert runtime.request_deterministic_ops(True)  # Already there: not added twice.
  assert os.environ["XLA_FLAGS"].count("deterministic") == 1
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=false")  # The user's choice wins.
  assert not runtime.request_deterministic_ops(True)
  assert os.environ["XLA_FLAGS"] == "--xla_gpu_deterministic_ops=false"
  monkeypatch.delenv("XLA_FLAGS")
  assert not runtime.request_deterministic_ops(False)  # config.deterministic = False.
  assert "XLA_FLAGS" not in os.environ


def test_xla_accepts_the_deterministic_flag_set_after_importing_jax():
  """XLA aborts on a flag it does not know; set before the backend starts, this one runs."""
  code = ("import jax; from fame_jax import runtime; runtime.request_deterministic_ops(True); "
          "import os; print(os.environ['XLA_FLAGS']); print(jax.jit(lambda x: x * 2)(21))")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.pathsep.join(sys.path)
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["--xla_gpu_deterministic_ops=true", "42"]
