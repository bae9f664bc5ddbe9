"""Orbax checkpoints of a run: the latest state (to resume) and the best one.

Layout of a workdir:
  config.json              the run's configuration
  checkpoints/latest/<step>  train state + progress (epoch, position in the epoch, ...)
  checkpoints/best/<step>    train state of the best validation score + its metrics

Orbax writes each checkpoint into a temporary directory and renames it when
complete, so an interrupted write is never taken for a checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

CONFIG_FILE = "config.json"
# Fields that may change between a run and its resumption or evaluation.
MUTABLE_FIELDS = frozenset({
    "num_epochs", "eval_batch_size", "eval_every_epochs", "early_stop_patience",
    "checkpoint_every_steps", "checkpoint_every_secs", "log_every_steps", "data.dir",
    "eval_chunk_size", "loss_chunk_size", "loss_row_block", "eval_user_block", "steps_per_call",
    "deterministic", "loss_kernel",
})


class CheckpointError(ValueError):
  """A missing or mismatched checkpoint; the message names the directory or field."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, (dict, ml_collections.ConfigDict)):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def config_differences(saved: dict[str, Any], config: ml_collections.ConfigDict,
                       ignore=MUTABLE_FIELDS) -> list[str]:
  """Fields (other than `ignore`) whose value differs: `["model.num_heads: 2 -> 4", ...]`."""
  old, new = _flatten(saved), _flatten(config_to_dict(config))
  diffs = []
  for key in sorted(set(old) | set(new)):
    if key in ignore or any(key.startswith(f + ".") for f in ignore):
      continue
    if old.get(key, "<absent>") != new.get(key, "<absent>"):
      diffs.append(f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
  return diffs


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes `config.json` atomically (write a temporary file, then rename)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(config_to_dict(config), f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: not found; is {workdir!r} the workdir of a training run?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_saved_config_dict(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """`{"params.block_0.ffn.inner.kernel": (shape, dtype), ...}` for the arrays of a train
  state, or of a checkpoint's metadata tree (Orbax names its leaves the same way)."""
  def name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in path)
  return {name(path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_fits(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
  """Raises CheckpointError, naming the first differing array, when the checkpoint's arrays
  (names, shapes, dtypes) are not the model's. Checked from the metadata, before any array
  is read: an Orbax restore that fails midway leaves its reads running."""
  try:
    saved = manager.item_metadata(step)["state"]
  except Exception:  # pylint: disable=broad-except
    return  # Unreadable metadata: the restore itself reports (or falls back).
  if saved is None:
    return
  saved, wanted = _leaf_specs(saved), _leaf_specs(abstract_state)
  problems = [f"{k}: saved {saved[k][0]} {saved[k][1]}, the model has {wanted[k][0]} "
              f"{wanted[k][1]}" for k in wanted if k in saved and saved[k] != wanted[k]]
  problems += [f"{k}: not in the checkpoint" for k in sorted(set(wanted) - set(saved))]
  problems += [f"{k}: not in the model" for k in sorted(set(saved) - set(wanted))]
  if problems:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise CheckpointError(f"{manager.directory}/{step}: checkpoint does not match the model "
                          f"built from the config: {problems[0]}{more}")


class RunCheckpoints:
  """The two Orbax managers of a run: "latest" (resume) and "best" (evaluate)."""

  def __init__(self, workdir: str, keep_latest: int = 2):
    root = os.path.abspath(os.path.join(workdir, "checkpoints"))

    def options(name: str, max_to_keep: int) -> ocp.CheckpointManagerOptions:
      # Both managers save at the same step at the end of an epoch; with several
      # processes their barriers must have distinct names, or they collide and hang.
      return ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=True,
          multiprocessing_options=ocp.options.MultiprocessingOptions(
              barrier_sync_key_prefix=f"fame_jax_{name}"))

    def manager(name: str, max_to_keep: int) -> ocp.CheckpointManager:
      # Handlers named up front, so that a checkpoint's metadata can be read before it is.
      return ocp.CheckpointManager(
          os.path.join(root, name), options=options(name, max_to_keep),
          item_handlers={"state": ocp.StandardCheckpointHandler(),
                         "meta": ocp.JsonCheckpointHandler()})

    self.latest = manager("latest", keep_latest)
    self.best = manager("best", 1)

  @staticmethod
  def _save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any]) -> None:
    if step in manager.all_steps():
      # A resumed run redoing a step whose checkpoint exists (an unreadable latest one it fell
      # back from, or a best one saved just before a crash): replace it.
      manager.delete(step)
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)), force=True)

  def save_latest(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    self._save(self.latest, step, state, meta)

  def save_best(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    self._save(self.best, step, state, meta)

  @staticmethod
  def _restore(manager: ocp.CheckpointManager, step: int | None,
               abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    step = manager.latest_step() if step is None else step
    if step is None:
      return None
    if step not in manager.all_steps():
      raise CheckpointError(f"{manager.directory}: no checkpoint for step {step}; "
                            f"available: {sorted(manager.all_steps())}")
    _check_fits(manager, step, abstract_state)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointError(f"{manager.directory}/{step}: checkpoint does not match the "
                            f"model built from the config ({first[:300]})") from None
    return restored.state, restored.meta

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    """The newest complete, readable "latest" checkpoint (None if there is none).

    Partially written checkpoints (Orbax's temporary directories) are never
    candidates; a finalized one that cannot be read is skipped with a warning in
    favour of the one before it. A checkpoint that does not fit the model
    (another config) is an error, not a reason to fall back: it is raised when no
    older checkpoint fits either (TensorStore reports some damaged files as the
    same ValueError as a shape mismatch, so only an older checkpoint that does
    restore tells the two apart).
    """
    root = os.fspath(self.latest.directory)
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
      if ".orbax-checkpoint-tmp" in name:
        logging.warning("Ignoring incomplete checkpoint %s (interrupted while being written).",
                        os.path.join(root, name))
    steps = sorted(self.latest.all_steps(), reverse=True)
    failed: list[tuple[int, Exception]] = []
    for step in steps:
      try:
        restored = self._restore(self.latest, step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        failed.append((step, e))
        continue
      for bad_step, e in failed:
        logging.warning("Checkpoint %s/%d is unreadable (%s: %s); falling back to step %d.",
                        root, bad_step, type(e).__name__, str(e)[:200], step)
      return restored
    if not failed:
      return None
    step, e = failed[0]
    if isinstance(e, CheckpointError):
      raise e
    raise CheckpointError(f"{root}/{step}: unreadable checkpoint ({type(e).__name__}: "
                          f"{str(e)[:200]}) and no older readable one to fall back to") from None

  def restore_best(self, abstract_state: Any,
                   step: int | None = None) -> tuple[Any, dict[str, Any]] | None:
    """The best checkpoint, or the one at `step` (searched in best, then latest)."""
    if step is not None and step not in self.best.all_steps():
      return self._restore(self.latest, step, abstract_state)
    return self._restore(self.best, step, abstract_state)

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()
