#!/usr/bin/env bash
# On a machine with a GPU: a profile of the training step (benchmarks/profile_step.py), the
# full FAME run on Beauty (wall time, host and device memory, per-epoch times) and the
# side-by-side benchmark (PyTorch on the same GPU), in that order, all into OUT_DIR.
#
#   FAME_DATA_DIR=/path/to/data bash benchmarks/gpu.sh OUT_DIR
#
# The first full run starts from an empty XLA compilation cache (its wall time includes
# compiling), the second (skipped with SKIP_WARM_RUN=1) from the cache the first left.
# SKIP_PROFILE=1 skips the profile (step 1), SKIP_BENCH=1 the benchmark (step 3): with a
# short lease, `SKIP_PROFILE=1 SKIP_BENCH=1` measures only the two full runs.
# TRAIN_TIMEOUT / BENCH_TIMEOUT / PROFILE_TIMEOUT (seconds) bound each run; BENCH_ARGS adds flags to
# bench.py (e.g. --skip_torch_compile); PYTHON names the interpreter (default python3).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
out=$(mkdir -p "$out" && cd "$out" && pwd)
cd "$here/.."  # The repository root.
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

"$py" - <<'PY' 2>&1 | tee "$out/versions.txt"
import importlib.metadata as md
import jax
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "ml_collections",
             "tensorboardX", "numpy", "torch"):
  try:
    print(name, md.version(name))
  except md.PackageNotFoundError:
    print(name, None)
print("devices", jax.devices(), jax.devices()[0].device_kind)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 \
  | tee -a "$out/versions.txt"

# 1. Where a training step's time goes on this device: kernels per step, their summed time,
#    and the share of the wall time with a kernel running (FAME, then SASRec). First: it is
#    short, and it is what the next optimisation needs (device time is scarce).
for model in fame sasrec; do
  [ -n "${SKIP_PROFILE:-}" ] && break
  timeout "${PROFILE_TIMEOUT:-300}" "$py" "$here/profile_step.py" --dataset beauty --model "$model" \
    --steps 20 --top 30 --trace_dir "$out/trace_$model" --out "$out/profile_$model.json" 2>&1 \
    | tee "$out/profile_$model.log"
done

# 2. The full run, as a user starts it (cold compilation cache, fresh workdir), then the same
#    run again into a new workdir with the compilation cache it left (compiles loaded from disk).
work=$(mktemp -d)
for run in cold warm; do
  echo "[$(date +%T)] full Beauty run, $run compilation cache" | tee "$out/train_beauty_$run.log"
  FAME_JAX_CACHE_DIR="$work/xla_cache" timeout "${TRAIN_TIMEOUT:-900}" \
    "$py" "$here/timed_run.py" --out "$out/train_beauty_$run.json" -- \
    "$py" train.py --config configs/beauty.py --workdir "$work/beauty_$run" 2>&1 \
    | tee -a "$out/train_beauty_$run.log"
  cp "$work/beauty_$run/metrics.jsonl" "$out/train_beauty_${run}_metrics.jsonl" 2>/dev/null
  [ -n "${SKIP_WARM_RUN:-}" ] && break
done

# 3. The benchmark. JAX does not pre-allocate GPU memory here, so PyTorch has room beside it.
[ -n "${SKIP_BENCH:-}" ] && exit 0
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${BENCH_TIMEOUT:-1800}" \
  "$py" "$here/bench.py" --dataset beauty --skip_torch_compile_packed ${BENCH_ARGS:-} \
  --out "$out/bench_beauty.json" 2>&1 | tee "$out/bench_beauty.log"

