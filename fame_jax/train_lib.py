"""Training: optimizer, the pure sharded train step, and the epoch loop.

`train_step(state, batch, rng) -> (state, metrics)` is a pure function;
`train_steps` runs it over several stacked batches in one program (what the
epoch loop calls, `config.steps_per_call` at a time). Both are jitted with
explicit `NamedSharding`s (batch rows split over the 'data' mesh axis, state
replicated) and the state donated. A step whose loss or gradient is not
finite leaves the state unchanged and reports itself, so the loop can stop
with the step number while the last good state (and checkpoint) is intact.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from flax.training import train_state as train_state_lib
from jax.experimental import multihost_utils

from fame_jax import checkpointing
from fame_jax import cpu_kernels
from fame_jax import data as data_lib
from fame_jax import evaluation
from fame_jax import flops as flops_lib
from fame_jax import model as model_lib
from fame_jax import runtime
from fame_jax import scoring
from fame_jax import sharding as sharding_lib
from fame_jax import metric_writers

TrainState = train_state_lib.TrainState
Batch = dict[str, jax.Array]
NO_BAD_STEP = np.iinfo(np.int32).max


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient became NaN/Inf; the message names the step."""


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam(W) with optional linear warm-up and global-norm clipping."""
  lr = optim.learning_rate
  if optim.warmup_steps > 0:
    lr = optax.linear_schedule(0.0, optim.learning_rate, optim.warmup_steps)
  if optim.weight_decay > 0:
    tx = optax.adamw(lr, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay)
  else:
    tx = optax.adam(lr, b1=optim.b1, b2=optim.b2)
  if optim.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), tx)
  return tx


def init_train_state(model: model_lib.SequenceRecommender, tx: optax.GradientTransformation,
                     rng: jax.Array) -> TrainState:
  items = jnp.ones((1, model.cfg.max_len), jnp.int32)
  params = model.init({"params": rng}, items, deterministic=True)["params"]
  state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  # A strongly typed step, like a restored one, so a resumed run reuses the compiled step.
  return state.replace(step=jnp.zeros((), jnp.int32))


def next_item_loss(model: model_lib.SequenceRecommender, params: Any, batch: Batch,
                   rng: jax.Array | None, chunk_size: int,
                   mesh: jax.sharding.Mesh | None = None,
                   row_block: int = 0, fused: bool = False) -> tuple[jax.Array, jax.Array]:
  """Summed -log p(target) over non-padding positions, and their number.

  `chunk_size`, `row_block` and `fused` choose how the catalogue is scored
  (`output_nll`).
  """
  deterministic = rng is None
  out = model.apply({"params": params}, batch["items"], segments=batch.get("segments"),
                    positions=batch.get("positions"), deterministic=deterministic,
                    rngs=None if deterministic else {"dropout": rng})
  b, length, k, d = out.vectors.shape
  targets = batch["targets"].reshape(b * length)
  loss_sum = output_nll(model.cfg, params, out.vectors.reshape(b * length, k, d),
                        out.log_weights.reshape(b * length, k), targets, chunk_size, mesh,
                        row_block, fused)
  return loss_sum, jnp.sum(targets > 0, dtype=jnp.float32)


def output_nll(cfg: model_lib.ModelConfig, params: Any, vectors: jax.Array,
               log_weights: jax.Array, targets: jax.Array, chunk_size: int,
               mesh: jax.sharding.Mesh | None = None, row_block: int = 0,
               fused: bool = False) -> jax.Array:
  """The output layer: what the user vectors `[T, K, D]` score against
  (`model.item_tables`) and the summed -log p(target) (`scoring.next_item_nll`).

  With `fused` both run as the CPU kernel `cpu_kernels.fused_nll` (one device; the
  caller checks that it applies, as `Experiment.fused_loss` does).
  """
  if fused:
    with jax.named_scope("next_item_nll"):  # Profiles attribute its ops to this name.
      return cpu_kernels.fused_nll(vectors, log_weights, targets,
                                   params["item_embedding"]["embedding"],
                                   params["item_projection"], cfg.num_items)
  return scoring.next_item_nll(vectors, log_weights, targets, model_lib.item_tables(params, cfg),
                               chunk_size, row_block, model_lib.DTYPES[cfg.dtype], mesh)


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *,
               model: model_lib.SequenceRecommender, chunk_size: int,
               mesh: jax.sharding.Mesh | None = None,
               row_block: int = 0, fused_loss: bool = False) -> tuple[TrainState, dict]:
  """One Adam step on the mean next-item cross-entropy of the batch.

  `chunk_size`, `row_block` and `fused_loss`: how the loss scores the catalogue
  (`next_item_loss`);
  `mesh` tells it how the batch and the item table are split.
  """
  dropout_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    loss_sum, count = next_item_loss(model, params, batch, dropout_rng, chunk_size, mesh,
                                     row_block, fused_loss)
    return loss_sum / jnp.maximum(count, 1.0), (loss_sum, count)

  (loss, (loss_sum, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  # A batch without targets (the padding of a `train_steps` call) changes nothing.
  update = finite & (count > 0)
  with jax.named_scope("optimizer"):
    if jax.default_backend() == "cpu":  # One branch: no per-leaf select thunks (~2 ms a step).
      state = jax.lax.cond(update, lambda s: s.apply_gradients(grads=grads), lambda s: s, state)
    else:  # A conditional would read its predicate back to the host and stall the step loop.
      new_state = state.apply_gradients(grads=grads)
      state = jax.tree.map(lambda new, old: jnp.where(update, new, old), new_state, state)
  metrics = {"loss_sum": jnp.where(finite, loss_sum, 0.0), "num_targets": count,
             "grad_norm": grad_norm,
             "bad_step": jnp.where(finite, NO_BAD_STEP, state.step).astype(jnp.int32)}
  return state, metrics


def train_steps(state: TrainState, batches: Batch, rng: jax.Array, **step_kwargs: Any
                ) -> tuple[TrainState, dict]:
  """`train_step` over each batch of `batches` (stacked: `[steps, rows, length]`), in order.

  One program runs all of them (a `lax.scan`), so the host dispatches and
  transfers once per call instead of once per step. Batches without targets
  (all zeros) pad the last call of an epoch and leave the state unchanged.
  Returns the state and each step's metrics, stacked (`[steps]` each).
  """
  chex.assert_rank(batches["items"], 3)
  step = functools.partial(train_step, **step_kwargs)
  if batches["items"].shape[0] == 1:  # No loop: the program of a single step.
    state, metrics = step(state, jax.tree.map(lambda x: x[0], batches), rng)
    return state, jax.tree.map(lambda x: x[None], metrics)
  return jax.lax.scan(lambda s, batch: step(s, batch, rng), state, batches)


def auto_steps_per_call(backend: str, steps_per_epoch: int) -> int:
  """Training steps per jitted call when `config.steps_per_call` is -1.

  On CPU 1: a step takes tens of milliseconds, its dispatch microseconds. On a
  GPU or TPU a Beauty step takes ~1.4 ms, and dispatching it, transferring its
  batch and summing its loss one step at a time made the epoch ~3x longer
  (benchmarks/README.md): there, the number in 8..16 that pads the epoch's
  last call with the fewest empty steps (the largest of those on a tie), or
  the whole epoch when it is shorter than 8 steps.
  """
  if backend == "cpu":
    return 1
  if steps_per_epoch < 8:
    return max(steps_per_epoch, 1)
  return min(range(16, 7, -1), key=lambda k: -steps_per_epoch % k)


@dataclasses.dataclass
class Progress:
  """Where a run is; saved with every checkpoint so that a resume continues exactly."""
  epoch: int = 0  # Epochs completed.
  step_in_epoch: int = 0  # Batches of epoch `epoch` already trained on.
  best_metric: float = -math.inf
  best_epoch: int = -1
  evals_without_improvement: int = 0
  finished: bool = False  # Early-stopped; reaching num_epochs is not final (more may be asked).
  loss_sum: float = 0.0  # Running sums of the current epoch (for an exact resume).
  num_targets: float = 0.0

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["best_metric"] = None if math.isinf(d["best_metric"]) else d["best_metric"]
    return d

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "Progress":
    d = dict(d)
    d["best_metric"] = -math.inf if d.get("best_metric") is None else d["best_metric"]
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def validate_training_config(config: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` naming the first impossible training field."""
  checks = [
      ("batch_size", config.batch_size >= 1, ">= 1"),
      ("eval_batch_size", config.eval_batch_size >= 1 or config.eval_batch_size == -1,
       ">= 1, or -1 (auto)"),
      ("num_epochs", config.num_epochs >= 0, ">= 0"),
      ("eval_every_epochs", config.eval_every_epochs >= 1, ">= 1"),
      ("early_stop_patience", config.early_stop_patience >= 1, ">= 1"),
      ("checkpoint_every_steps", config.checkpoint_every_steps >= 0, ">= 0"),
      ("checkpoint_every_secs", config.get("checkpoint_every_secs", 0) >= 0, ">= 0"),
      ("steps_per_call", config.get("steps_per_call", -1) >= 1
       or config.get("steps_per_call", -1) == -1, ">= 1, or -1 (auto)"),
      ("steps_per_call", config.get("steps_per_call", -1) <= 1 or config.data.packing,
       "1 or -1 without data.packing (unpacked batches differ in length and cannot be stacked)"),
      ("loss_chunk_size", config.loss_chunk_size >= -1, ">= 0, or -1 (auto)"),
      ("loss_row_block", config.get("loss_row_block", -1) >= -1, ">= 0, or -1 (auto)"),
      ("loss_kernel", config.get("loss_kernel", "auto") in ("auto", "xla"), '"auto" or "xla"'),
      ("eval_chunk_size", config.eval_chunk_size >= 0, ">= 0"),
      ("eval_user_block", config.get("eval_user_block", -1) >= -1, ">= 0, or -1 (auto)"),
      ("optim.learning_rate", config.optim.learning_rate > 0, "> 0"),
      ("optim.warmup_steps", config.optim.warmup_steps >= 0, ">= 0"),
      ("optim.weight_decay", config.optim.weight_decay >= 0, ">= 0"),
      ("optim.grad_clip_norm", config.optim.grad_clip_norm >= 0, ">= 0"),
      ("data.max_len", config.data.max_len >= 1, ">= 1"),
  ]
  for field, ok, requirement in checks:
    if not ok:
      raise model_lib.ConfigError(
          f"config.{field}: must be {requirement}, got {_field(config, field)!r}")
  metrics = scoring.metrics_from_ranks(np.zeros(1))
  if config.early_stop_metric not in metrics:
    raise model_lib.ConfigError(f"config.early_stop_metric: got {config.early_stop_metric!r}, "
                                f"expected one of {sorted(metrics)}")


def _field(config: ml_collections.ConfigDict, dotted: str) -> Any:
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


@dataclasses.dataclass
class Experiment:
  """Everything a run needs that follows from the config and the data."""
  config: ml_collections.ConfigDict
  dataset: data_lib.Dataset
  model: model_lib.SequenceRecommender
  mesh: jax.sharding.Mesh
  buckets: tuple[int, ...]
  tx: optax.GradientTransformation

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  dataset: data_lib.Dataset | None = None,
                  devices: list[jax.Device] | None = None) -> "Experiment":
    """Loads the data (unless given) and builds model, mesh (over `devices`, default all)."""
    runtime.keep_freed_host_memory()  # CPU: no page faults on each step's temporaries.
    runtime.unroll_threefry_on_cpu()  # Same dropout masks, drawn faster on CPU.
    dataset = data_lib.load_dataset(config) if dataset is None else dataset
    model_cfg = model_lib.model_config_from(config, dataset.num_items)
    validate_training_config(config)
    if (config.get("deterministic", True) and jax.default_backend() == "gpu"
        and not runtime.deterministic_ops_on()):
      logging.warning("config.deterministic: the GPU backend started without %s in XLA_FLAGS "
                      "(train.py sets it); this run's numbers may differ from run to run",
                      runtime.DETERMINISTIC_FLAG)
    mesh = sharding_lib.make_mesh(config.mesh_model_axis, devices)
    sharding_lib.check_batch_size(config.batch_size, mesh, "batch_size")
    buckets = data_lib.bucket_lengths(config.data.length_buckets, config.data.max_len)
    exp = cls(config, dataset, model_lib.build_model(model_cfg), mesh, buckets,
              make_optimizer(config.optim))
    sharding_lib.check_batch_size(exp.eval_batch_size, mesh, "eval_batch_size")
    return exp

  def _state_shapes(self) -> TrainState:
    return jax.eval_shape(functools.partial(init_train_state, self.model, self.tx),
                          jax.random.key(0))

  def state_sharding(self) -> Any:
    """Where each leaf of the train state lives (see `sharding.partition_spec`)."""
    return sharding_lib.state_shardings(self._state_shapes(), self.mesh)

  def init_state(self) -> TrainState:
    rng = jax.random.fold_in(jax.random.key(self.config.seed), 0)
    init = jax.jit(functools.partial(init_train_state, self.model, self.tx),
                   out_shardings=self.state_sharding())
    return init(rng)

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the train state, without computing it."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        self._state_shapes(), self.state_sharding())

  def _step_kwargs(self) -> dict[str, Any]:
    return {"model": self.model, "chunk_size": self.loss_chunk_size, "mesh": self.mesh,
            "row_block": self.loss_row_block, "fused_loss": self.fused_loss}

  def jit_train_step(self) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
    """The train step, jitted: batch split over 'data', state laid out as declared, donated."""
    repl, state_sharding = sharding_lib.replicated(self.mesh), self.state_sharding()
    return jax.jit(functools.partial(train_step, **self._step_kwargs()),
                   in_shardings=(state_sharding, sharding_lib.batch_sharding(self.mesh), repl),
                   out_shardings=(state_sharding, repl), donate_argnums=(0,),
                   compiler_options=runtime.compiler_options())

  def jit_train_steps(self) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
    """`train_steps`, jitted like `jit_train_step`; what the training loop calls.

    Its batches are `steps_per_call` batches stacked (`BatchPlan.stacked_batch`),
    split over 'data' along their rows.
    """
    repl, state_sharding = sharding_lib.replicated(self.mesh), self.state_sharding()
    return jax.jit(functools.partial(train_steps, **self._step_kwargs()),
                   in_shardings=(state_sharding, sharding_lib.stacked_batch_sharding(self.mesh),
                                 repl),
                   out_shardings=(state_sharding, repl), donate_argnums=(0,),
                   compiler_options=runtime.compiler_options())

  @property
  def steps_per_call(self) -> int:
    """`config.steps_per_call`, with -1 resolved for this backend (`auto_steps_per_call`)."""
    steps = self.config.get("steps_per_call", -1)  # Absent from configs saved before it.
    if steps >= 1:
      return steps
    if not self.config.data.packing:
      return 1
    return auto_steps_per_call(jax.default_backend(), self.batch_plan().steps_per_epoch())

  @functools.cached_property
  def _plan(self) -> data_lib.BatchPlan:
    windows = data_lib.training_windows(data_lib.train_sequences(self.dataset),
                                        self.config.data.max_len)
    return data_lib.BatchPlan.create(windows, self.config,
                                     row_multiple=self.mesh.shape[sharding_lib.DATA_AXIS])

  def batch_plan(self) -> data_lib.BatchPlan:
    """Training batches of this experiment (rows a multiple of the 'data' devices)."""
    return self._plan

  def _positions_per_device(self) -> int:
    """Positions of a training batch that one device on the 'data' axis holds."""
    plan = self.batch_plan()
    rows = plan.rows_per_batch if plan.packing else plan.batch_size
    return rows * plan.max_len // self.mesh.shape[sharding_lib.DATA_AXIS]

  @property
  def loss_chunk_size(self) -> int:
    """`config.loss_chunk_size`, with -1 resolved for this backend (`scoring.auto_chunk_size`)."""
    if self.config.loss_chunk_size >= 0:
      return self.config.loss_chunk_size
    return scoring.auto_chunk_size(jax.default_backend(), self._positions_per_device(),
                                   self.model.cfg.num_vectors, self.model.cfg.num_items)

  @property
  def loss_row_block(self) -> int:
    """`config.loss_row_block`, with -1 resolved for this backend (`scoring.auto_row_block`)."""
    block = self.config.get("loss_row_block", -1)  # Absent from configs saved before it.
    if block >= 0:
      return block
    return scoring.auto_row_block(jax.default_backend(), self._positions_per_device(),
                                  self.model.cfg.num_vectors, self.model.cfg.num_items)

  @property
  def fused_loss(self) -> bool:
    """Whether the training loss runs as `cpu_kernels.fused_nll` (`config.loss_kernel`):
    "auto" where the row-blocked loss runs on one CPU device and the kernel applies
    and builds."""
    cfg = self.model.cfg
    return (self.config.get("loss_kernel", "auto") == "auto"
            and jax.default_backend() == "cpu" and self.mesh.size == 1
            and self.loss_row_block > 0 and cfg.per_head_tables
            and cpu_kernels.applies(cfg.num_vectors, cfg.vector_size, model_lib.DTYPES[cfg.dtype])
            and cpu_kernels.available())

  @property
  def eval_user_block(self) -> int:
    """`config.eval_user_block`, with -1 resolved for this backend (`scoring.auto_user_block`)."""
    block = self.config.get("eval_user_block", -1)  # Absent from configs saved before it.
    if block >= 0:
      return block
    return scoring.auto_user_block(jax.default_backend())

  @property
  def eval_batch_size(self) -> int:
    """`config.eval_batch_size`, -1 resolved for this backend (`scoring.auto_eval_batch_size`)."""
    size = self.config.eval_batch_size
    if size >= 1:
      return size
    return scoring.auto_eval_batch_size(jax.default_backend(), self.model.cfg.num_vectors,
                                        self.model.cfg.num_items)

  def eval_data(self, split: str) -> data_lib.EvalData:
    """The split's evaluation data, with the test split's `exclude` width (see `eval_batches`)."""
    return data_lib.eval_data(data_lib.eval_split(self.dataset, split), self.config.data.max_len,
                              self.config.data.exclude_history,
                              self._exclude_width if self.config.data.exclude_history else 0)

  @functools.cached_property
  def _exclude_width(self) -> int:
    """The most distinct items in a test history (test histories hold the validation ones)."""
    return max(len(np.unique(h)) for h in data_lib.eval_split(self.dataset, "test").histories)

  def make_eval_fn(self) -> evaluation.EvalFn:
    return evaluation.make_eval_fn(self.model, self.mesh, self.config.eval_chunk_size,
                                   self.eval_user_block)

  def eval_batches(self, data: data_lib.EvalData) -> evaluation.HostBatches:
    """`data`'s evaluation batches, as `evaluation.evaluate` cuts them for this config.

    Packed, every split's batches take the validation batches' shape, so that
    evaluation compiles once per run (the test histories, one item longer,
    would otherwise need a second program).
    """
    packing = self.config.data.packing
    return evaluation.host_batches(data, self.eval_batch_size, self.buckets, self.mesh, packing,
                                   rows=self._eval_rows if packing else None)

  @functools.cached_property
  def _eval_rows(self) -> int:
    """Rows of the validation split's packed evaluation batches."""
    (batch, _), *_ = evaluation.host_batches(self.eval_data("valid"), self.eval_batch_size,
                                             self.buckets, self.mesh, packing=True)
    return batch["items"].shape[0]


def _validate(exp: Experiment, eval_fn: evaluation.EvalFn, state: TrainState,
              valid_data: data_lib.EvalData, valid_batches: evaluation.HostBatches,
              progress: Progress) -> tuple[dict[str, float], dict[str, Any] | None]:
  """Validation metrics, and advances early stopping.

  Returns the record's fields and, when the state is the best so far, the metadata of
  its "best" checkpoint (else None).
  """
  config = exp.config
  start = time.perf_counter()
  metrics, _ = evaluation.evaluate(eval_fn, state.params, valid_data, exp.eval_batch_size,
                                   exp.buckets, exp.mesh, config.data.packing, valid_batches)
  score = metrics[config.early_stop_metric]
  best_meta = None
  if score > progress.best_metric:
    progress.best_metric, progress.best_epoch = score, progress.epoch
    progress.evals_without_improvement = 0
    best_meta = {"progress": progress.to_json(), "valid": metrics}
  else:
    progress.evals_without_improvement += 1
    if progress.evals_without_improvement >= config.early_stop_patience:
      progress.finished = True
      logging.info("Early stopping: no %s improvement in %d evaluations (best %.4f at epoch %d).",
                   config.early_stop_metric, config.early_stop_patience, progress.best_metric,
                   progress.best_epoch)
  return {"eval_seconds": time.perf_counter() - start,
          **{f"valid/{k}": v for k, v in metrics.items()}}, best_meta


def _all_agree(decision: bool) -> bool:
  """Process 0's `decision` in every process: Orbax saves are collective, and clocks differ."""
  if jax.process_count() == 1:
    return decision
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(decision)))


class PreemptionWatcher:
  """Turns SIGTERM into a request to checkpoint and stop at the next step.

  With several processes, all of them stop at the same step (JAX's pre-emption
  sync point, which needs `jax.distributed.initialize`).
  """

  def __init__(self):
    self._requested = False
    self._previous = None

  def __enter__(self) -> "PreemptionWatcher":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested


def check_resumable(workdir: str, config: ml_collections.ConfigDict,
                    allow_config_change: bool) -> None:
  """Refuses to continue a workdir written with a different config (unless allowed)."""
  saved = checkpointing.load_saved_config_dict(workdir)
  if saved is None or allow_config_change:
    return
  diffs = checkpointing.config_differences(saved, config)
  if diffs:
    raise checkpointing.CheckpointError(
        f"{os.path.join(workdir, checkpointing.CONFIG_FILE)}: the workdir was written with a "
        f"different config ({'; '.join(diffs)}); use another --workdir, or pass "
        "--allow_config_change to resume anyway")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False,
                       dataset: data_lib.Dataset | None = None,
                       devices: list[jax.Device] | None = None) -> dict[str, Any]:
  """Trains (resuming from the latest checkpoint if any), then evaluates the best state.

  `devices`: those the run's mesh spans (default: all). Returns
  `{"valid": metrics, "test": metrics, "progress": ...}`.
  """
  check_resumable(workdir, config, allow_config_change)
  exp = Experiment.from_config(config, dataset, devices)
  plan = exp.batch_plan()
  valid_data = exp.eval_data("valid")
  valid_batches = exp.eval_batches(valid_data)  # Built once, evaluated every epoch.
  steps_per_epoch = plan.steps_per_epoch()  # Packs an epoch: once, not per use.
  # What an epoch asks of the model, whatever its packing: the epoch records' FLOP rate.
  epoch_flops = flops_lib.train_flops(
      exp.model.cfg, flops_lib.TokenStats.of_windows(plan.windows, steps_per_epoch))
  logging.info("%s: %d users, %d items, %d training windows (%d targets), %d steps/epoch, "
               "%.4g TFLOP/epoch (real tokens, %.0f%% in the output layer), "
               "%d device(s) (%s); loss row block %d positions (0 = off), loss chunk %d items, "
               "loss kernel %s, ranking block %d users (0 = all)",
               exp.dataset.name, exp.dataset.num_users, exp.dataset.num_items,
               len(plan.windows.lengths), plan.windows.num_targets, steps_per_epoch,
               epoch_flops["total"] / 1e12,
               100 * epoch_flops["output_layer"] / epoch_flops["total"],
               jax.device_count(), jax.default_backend(), exp.loss_row_block,
               exp.loss_chunk_size, "cpu_kernels.fused_nll" if exp.fused_loss else "xla",
               exp.eval_user_block)

  checkpoints = checkpointing.RunCheckpoints(workdir)
  restored = checkpoints.restore_latest(exp.abstract_state())
  if restored is None:
    state, progress = exp.init_state(), Progress()
  else:
    state, meta = restored
    progress = Progress.from_json(meta["progress"])
    logging.info("Resuming from step %d (epoch %d, batch %d).", int(state.step), progress.epoch + 1,
                 progress.step_in_epoch)
  if jax.process_index() == 0:
    checkpointing.save_config(workdir, config)

  p_train_steps = exp.jit_train_steps()
  steps_per_call = exp.steps_per_call
  eval_fn = exp.make_eval_fn()
  batch_sharding = sharding_lib.stacked_batch_sharding(exp.mesh)
  dropout_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  writer = metric_writers.MetricWriter(workdir, enabled=jax.process_index() == 0)
  writer.truncate(after_epoch=progress.epoch)  # Drop lines of epochs the resume will redo.
  copy_state = jax.jit(lambda s: jax.tree.map(jnp.copy, s))  # One dispatch, not one per leaf.

  # A new best state waits on the device (a copy: the next step donates `state`) until
  # the next save of the latest state, which writes both: the two on disk always agree.
  pending_best: tuple[int, TrainState, dict[str, Any]] | None = None
  last_save = time.monotonic()

  def save_latest():
    nonlocal pending_best, last_save
    if pending_best is not None:
      checkpoints.save_best(*pending_best)
      pending_best = None
    checkpoints.save_latest(host_step, state, {"progress": progress.to_json()})
    last_save = time.monotonic()

  def fold_metrics() -> None:
    """Adds the calls' metrics to the epoch's sums (one host sync); stops on a bad step."""
    bad = NO_BAD_STEP
    for metrics in jax.device_get(pending_metrics):
      for loss_sum, count, bad_step in zip(metrics["loss_sum"], metrics["num_targets"],
                                           metrics["bad_step"]):
        progress.loss_sum += float(loss_sum)
        progress.num_targets += float(count)
        bad = min(bad, int(bad_step))
    pending_metrics.clear()
    if bad != NO_BAD_STEP:
      checkpoints.wait()
      raise NonFiniteLossError(
          f"non-finite loss or gradient at step {bad} (epoch {progress.epoch + 1}); training "
          f"stopped, the last good checkpoint in {workdir}/checkpoints is intact")

  def every(n: int, before: int, after: int) -> bool:
    """Whether a multiple of `n` (> 0) lies in (before, after]."""
    return n > 0 and after // n > before // n

  preempted = False
  host_step = int(state.step)  # Mirrors state.step without a device sync per step.
  calls = 0  # Train calls of this process: the preemption sync point counts these.
  pending_metrics: list[dict[str, jax.Array]] = []  # Of calls not yet in `progress`' sums.
  with PreemptionWatcher() as preemption:
    try:
      while not progress.finished and progress.epoch < config.num_epochs:
        epoch_start = time.perf_counter()
        resumed_step_in_epoch = progress.step_in_epoch
        groups = plan.epoch_groups(config.seed, progress.epoch)  # Packed once per epoch.
        num_steps = len(groups)
        bar = tqdm.tqdm(total=num_steps, initial=progress.step_in_epoch,
                        desc=f"epoch {progress.epoch + 1}/{config.num_epochs}",
                        disable=jax.process_index() != 0, leave=False, dynamic_ncols=True)
        remaining = groups[progress.step_in_epoch:]
        chunks = [remaining[i:i + steps_per_call]
                  for i in range(0, len(remaining), steps_per_call)]
        batches = sharding_lib.prefetch_to_mesh(
            (plan.stacked_batch(chunk, steps_per_call) for chunk in chunks), batch_sharding)
        for chunk, batch in zip(chunks, batches):
          state, metrics = p_train_steps(state, batch, dropout_rng)
          pending_metrics.append(metrics)
          before = progress.step_in_epoch
          progress.step_in_epoch += len(chunk)
          host_step += len(chunk)
          calls += 1
          bar.update(len(chunk))
          if every(max(config.log_every_steps, 1), before, progress.step_in_epoch):
            fold_metrics()
            bar.set_postfix(loss=f"{progress.loss_sum / max(progress.num_targets, 1.0):.4f}")
          periodic = every(config.checkpoint_every_steps, before, progress.step_in_epoch)
          stop = preemption.reached(calls) and progress.step_in_epoch < num_steps
          if (periodic or stop) and progress.step_in_epoch < num_steps:
            fold_metrics()
            save_latest()
          if stop:
            preempted = True
            break
        bar.close()
        if preempted:
          break
        fold_metrics()
        seconds = time.perf_counter() - epoch_start
        record = {"epoch": progress.epoch + 1, "step": host_step,
                  "train_loss": progress.loss_sum / max(progress.num_targets, 1.0),
                  "train_seconds": seconds}
        if resumed_step_in_epoch == 0:  # A resumed epoch's clock missed its first steps.
          record["train_targets_per_second"] = plan.windows.num_targets / seconds
          record["train_gflops_per_second"] = epoch_flops["total"] / seconds / 1e9
        progress.epoch += 1
        progress.step_in_epoch, progress.loss_sum, progress.num_targets = 0, 0.0, 0.0
        best_meta = None
        if progress.epoch % config.eval_every_epochs == 0 or progress.epoch == config.num_epochs:
          fields, best_meta = _validate(exp, eval_fn, state, valid_data, valid_batches, progress)
          record.update(fields)
        writer.write(record)  # Before the checkpoint: a crash in between redoes the epoch.
        # Asked once: a SIGTERM arriving after the save decision must not stop an unsaved run.
        preempted = preemption.reached(calls)
        due = (progress.finished or progress.epoch >= config.num_epochs or preempted
               or _all_agree(time.monotonic() - last_save >= config.checkpoint_every_secs))
        if best_meta is not None:
          pending_best = (host_step, state if due else copy_state(state), best_meta)
        if due:
          save_latest()
        logging.info("%s", " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in record.items()))
        if preempted:
          break
    finally:
      checkpoints.wait()
      checkpoints.close()
      writer.close()

  if preempted:
    logging.warning("Pre-empted (SIGTERM): saved step %d (epoch %d, batch %d) in %s; run the "
                    "same command again to resume.", int(state.step), progress.epoch + 1,
                    progress.step_in_epoch, workdir)
    return {"preempted": True, "step": int(state.step), "progress": progress.to_json()}
  from fame_jax import eval_lib  # pylint: disable=g-import-not-at-top
  return eval_lib.evaluate_workdir(config, workdir, experiment=exp, eval_fn=eval_fn)
