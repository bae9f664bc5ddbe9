"""Device mesh and shardings: batches split over 'data', parameters replicated.

Batches enter as global `jax.Array`s built from each process's rows with
`jax.make_array_from_process_local_data`, so the same code serves one process
and many.
"""

from __future__ import annotations

import collections
from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"


def make_mesh(model_axis: int = 1, devices: list[jax.Device] | None = None) -> Mesh:
  """A `('data', 'model')` mesh over all devices (`model_axis` devices on 'model')."""
  devices = jax.devices() if devices is None else devices
  if model_axis < 1 or len(devices) % model_axis:
    raise ValueError(f"config.mesh_model_axis={model_axis} must divide the {len(devices)} devices")
  grid = np.asarray(devices).reshape(len(devices) // model_axis, model_axis)
  return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over 'data', the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches stacked along a leading steps axis: their rows (axis 1) over 'data'."""
  return NamedSharding(mesh, P(None, DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> None:
  n = mesh.shape[DATA_AXIS]
  if batch_size % n:
    raise ValueError(f"config.{field}={batch_size} must be divisible by the {n} devices "
                     "on the 'data' mesh axis")


def global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Turns a host batch (the same global batch on every process) into global arrays.

  Each process contributes only the rows (the axis `sharding` splits over
  'data') its devices hold.
  """
  nproc, pid = jax.process_count(), jax.process_index()
  if nproc == 1:  # One transfer call for the whole batch.
    return jax.device_put(batch, sharding)
  axis = list(sharding.spec).index(DATA_AXIS)

  def put(x: np.ndarray) -> jax.Array:
    rows = x.shape[axis] // nproc
    local = np.take(x, np.arange(pid * rows, (pid + 1) * rows), axis=axis)
    return jax.make_array_from_process_local_data(sharding, local, x.shape)

  return {k: put(v) for k, v in batch.items()}


def prefetch_to_mesh(batches: Iterator[dict[str, np.ndarray]], sharding: NamedSharding,
                     size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Yields global batches, keeping `size` of them already transferred ahead of the step."""
  queue: collections.deque = collections.deque()
  for batch in batches:
    queue.append(global_batch(batch, sharding))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def partition_spec(path: tuple, leaf: Any) -> P:
  """Declared layout of one parameter (or optimizer-state) leaf, from its tree path.

  The item-embedding table (and Adam's moments of it, whose paths end the same
  way) is split by rows over 'model'; everything else is replicated.
  """
  keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  if "item_embedding" in keys and getattr(leaf, "ndim", 0) == 2:
    return P(MODEL_AXIS, None)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """NamedShardings for a train state (or params) pytree of arrays/ShapeDtypeStructs."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, partition_spec(path, leaf)), abstract_state)
