"""Evaluates a run's best checkpoint (or --step) by full ranking on valid and test.

  python eval.py --workdir runs/beauty                    # uses runs/beauty/config.json
  python eval.py --workdir runs/beauty --config configs/beauty.py --step 1200
Writes <workdir>/eval_valid.json and <workdir>/eval_test.json.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from fame_jax import checkpointing
from fame_jax import eval_lib
from fame_jax import evaluation
from fame_jax import runtime

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Optional config file; must match the workdir's saved config.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: best).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process (multi-host) runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in 0..num_processes-1.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  runtime.keep_freed_host_memory()  # First: before JAX starts its CPU threads.
  runtime.setup_logging()
  runtime.enable_compilation_cache()
  runtime.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  workdir = _WORKDIR.value
  saved = checkpointing.load_config(workdir)
  if _CONFIG.value is not None:
    config = _CONFIG.value
    diffs = checkpointing.config_differences(saved.to_dict(), config)
    if diffs:
      raise checkpointing.CheckpointError(
          f"{workdir}/config.json: --config does not match the run's config: {'; '.join(diffs)}")
  else:
    config = saved
    if "FAME_DATA_DIR" in os.environ:
      config.data.dir = os.environ["FAME_DATA_DIR"]
  results = eval_lib.evaluate_workdir(config, workdir, step=_STEP.value)
  print(f"checkpoint: step {results['step']}")
  print(evaluation.format_table({"valid": results["valid"], "test": results["test"]}))
  print(f"wrote {workdir}/eval_valid.json and {workdir}/eval_test.json")


if __name__ == "__main__":
  app.run(runtime.exit_on_user_error(main))
