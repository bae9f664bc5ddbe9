"""Full-ranking evaluation: every item is a candidate, ranks computed on device."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from fame_jax import data as data_lib
from fame_jax import model as model_lib
from fame_jax import runtime
from fame_jax import scoring
from fame_jax import sharding as sharding_lib

@dataclasses.dataclass(frozen=True)
class EvalFn:
  """`eval_fn(params, batch) -> ranks [B]`, in two jitted parts: `tables(params)`, what
  the users are scored against (FAME: the per-head tables E W_f^(h), Eq. 9), and
  `rank(params, tables, batch)`. `evaluate` computes the tables once per pass,
  not once per batch."""
  tables: Callable[[Any], jax.Array]
  rank: Callable[[Any, jax.Array, dict[str, jax.Array]], jax.Array]

  def __call__(self, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    return self.rank(params, self.tables(params), batch)

  def lower(self, params: Any, batch: dict[str, Any]) -> Any:
    """`rank`'s lowering for these (possibly abstract) params and batch."""
    return self.rank.lower(params, jax.eval_shape(self.tables, params), batch)


def make_eval_fn(model: model_lib.SequenceRecommender, mesh: jax.sharding.Mesh,
                 chunk_size: int = 0, user_block: int = scoring.CPU_USER_BLOCK) -> EvalFn:
  """The jitted evaluation step, with the batch sharded over 'data'.

  `chunk_size` and `user_block` are `scoring.target_ranks`'s.
  """
  dtype = model_lib.DTYPES[model.cfg.dtype]

  def rank(params, tables, batch):
    if "user_rows" in batch:  # Packed histories (data.packed_eval_batches).
      slots = (batch["user_rows"], batch["user_columns"])
      packing = {"segments": batch["segments"], "positions": batch["positions"]}
    else:  # One right-padded history per row (data.eval_batches).
      slots, packing = (jnp.arange(batch["items"].shape[0]), batch["lengths"] - 1), {}
    # The last layer runs at each history's last item only.
    out = model.apply({"params": params}, batch["items"], deterministic=True, output_at=slots,
                      **packing)
    vectors, log_weights = out.vectors[:, 0], out.log_weights[:, 0]
    return scoring.target_ranks(vectors, log_weights, batch["targets"], batch["exclude"],
                                tables, chunk_size, dtype, mesh, user_block,
                                exclude_is_distinct=True)  # data.eval_data's rows are.

  options = runtime.compiler_options()
  return EvalFn(
      tables=jax.jit(functools.partial(model_lib.item_tables, cfg=model.cfg),
                     compiler_options=options),
      rank=jax.jit(rank, out_shardings=sharding_lib.batch_sharding(mesh),
                   compiler_options=options))


HostBatches = list[tuple[dict[str, np.ndarray], np.ndarray]]


def host_batches(data: data_lib.EvalData, batch_size: int, buckets: tuple[int, ...],
                 mesh: jax.sharding.Mesh, packing: bool = False,
                 rows: int | None = None) -> HostBatches:
  """The batches of an evaluation pass and the users each holds; build once, evaluate often.

  With `packing`, histories are packed end to end into rows (one batch shape,
  no padding; `data.packed_eval_batches`, which `rows` is passed to), else
  padded to length `buckets`.
  """
  if packing:
    return list(data_lib.packed_eval_batches(data, batch_size, row_multiple=mesh.shape["data"],
                                             rows=rows))
  return list(data_lib.eval_batches(data, batch_size, buckets))


def evaluate(eval_fn: EvalFn, params: Any, data: data_lib.EvalData, batch_size: int,
             buckets: tuple[int, ...], mesh: jax.sharding.Mesh, packing: bool = False,
             batches: HostBatches | None = None) -> tuple[dict[str, float], np.ndarray]:
  """Metrics over all users, and each user's 0-based rank (in user order).

  `batches` (from `host_batches` with the same arguments) saves rebuilding them.
  """
  sharding = sharding_lib.batch_sharding(mesh)
  if batches is None:
    batches = host_batches(data, batch_size, buckets, mesh, packing)
  tables = eval_fn.tables(params)
  pending = []
  for batch, index in batches:
    pending.append((eval_fn.rank(params, tables, sharding_lib.global_batch(batch, sharding)),
                    index))
  ranks = np.empty(len(data.targets), np.int64)
  for device_ranks, index in pending:  # One host transfer per batch, after all are queued.
    host = (multihost_utils.process_allgather(device_ranks, tiled=True)
            if jax.process_count() > 1 else np.asarray(device_ranks))
    ranks[index] = host[:len(index)]
  return scoring.metrics_from_ranks(ranks), ranks


def format_table(results: dict[str, dict[str, float]]) -> str:
  """A plain-text table: one row per split, one column per metric."""
  names = [f"{m}@{k}" for m in ("HR", "NDCG") for k in scoring.METRIC_KS] + ["MRR"]
  lines = ["split  " + "  ".join(f"{n:>8}" for n in names)]
  for split, metrics in results.items():
    lines.append(f"{split:<6} " + "  ".join(f"{metrics[n]:8.4f}" for n in names))
  return "\n".join(lines)
