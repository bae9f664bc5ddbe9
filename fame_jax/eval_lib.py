"""Offline evaluation of a run's checkpoint on the validation and test users."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from fame_jax import checkpointing
from fame_jax import evaluation
from fame_jax import train_lib


def _write_json(path: str, obj: Any) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str, step: int | None = None,
                     experiment: "train_lib.Experiment | None" = None,
                     eval_fn: evaluation.EvalFn | None = None) -> dict[str, Any]:
  """Restores the best checkpoint (or `step`) and ranks all items for valid and test users.

  Writes `<workdir>/eval_valid.json` and `<workdir>/eval_test.json` and returns
  `{"valid": metrics, "test": metrics, "step": restored step}`. `experiment` and
  `eval_fn` (its `make_eval_fn()`, already compiled) save rebuilding them.
  """
  exp = train_lib.Experiment.from_config(config) if experiment is None else experiment
  checkpoints = checkpointing.RunCheckpoints(workdir)
  try:
    abstract = exp.abstract_state()
    restored = checkpoints.restore_best(abstract, step)
    if restored is None:  # No evaluation ran yet: fall back to the latest state.
      restored = checkpoints.restore_latest(abstract)
    if restored is None:
      raise checkpointing.CheckpointError(
          f"{os.path.join(workdir, 'checkpoints')}: no checkpoint to evaluate; train first")
    state, _ = restored
  finally:
    checkpoints.close()
  eval_fn = exp.make_eval_fn() if eval_fn is None else eval_fn
  results: dict[str, Any] = {"step": int(state.step)}
  for split in ("valid", "test"):
    data = exp.eval_data(split)
    metrics, _ = evaluation.evaluate(eval_fn, state.params, data, exp.eval_batch_size,
                                     exp.buckets, exp.mesh, config.data.packing,
                                     exp.eval_batches(data))
    results[split] = metrics
    if jax.process_index() == 0:
      _write_json(os.path.join(workdir, f"eval_{split}.json"), {"step": int(state.step), **metrics})
  return results
