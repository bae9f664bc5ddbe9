"""Trains FAME or SASRec; resumes from the workdir's latest checkpoint if there is one.

  python train.py --config configs/beauty.py --workdir runs/beauty \
      --config.model.num_experts=8
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from fame_jax import evaluation
from fame_jax import runtime
from fame_jax import train_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir even if its saved config differs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process (multi-host) runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in 0..num_processes-1.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  runtime.keep_freed_host_memory()  # First: before JAX starts its CPU threads.
  runtime.request_deterministic_ops(_CONFIG.value.get("deterministic", True))  # Before XLA starts.
  runtime.setup_logging()
  runtime.enable_compilation_cache()
  runtime.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  results = train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                         allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  if results.get("preempted"):
    print(f"pre-empted: state saved at step {results['step']}; run the same command to resume")
    return
  print(f"best checkpoint: step {results['step']}")
  peak = runtime.peak_device_memory_mib()
  if peak is not None:
    print(f"peak device memory: {peak:.0f} MiB")
  print(evaluation.format_table({"valid": results["valid"], "test": results["test"]}))


if __name__ == "__main__":
  app.run(runtime.exit_on_user_error(main))
