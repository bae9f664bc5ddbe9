"""benchmarks/profile_step.py: reading a Perfetto trace into per-step kernel counts and times."""

from __future__ import annotations

import gzip
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import profile_step  # pylint: disable=g-import-not-at-top,wrong-import-position


def meta(pid, name, tid=None):
  if tid is None:
    return {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}
  return {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}}


def op(pid, name, ts, dur, tid=1):
  return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}


GPU_TRACE = [
    meta(1, "/host:CPU"), meta(2, "/device:GPU:0"),
    op(1, "PjitFunction(train_step)", 0, 100),  # Host side: not a kernel.
    op(2, "loop_add_fusion", 10, 5), op(2, "gemm_fusion", 12, 12),  # Overlaps the first, 12..15.
    op(2, "loop_add_fusion", 40, 5), op(2, "reduce", 60, 20),
]


def test_busy_time_is_the_union_of_overlapping_intervals():
  _, ops = profile_step.op_events(GPU_TRACE)
  assert profile_step.busy_time(ops) == (24 - 10) + 5 + 20


def test_device_kernels_are_counted_per_step_and_ranked_by_time(tmp_path):
  where, ops = profile_step.op_events(GPU_TRACE)
  assert where == "/device:GPU:0" and len(ops) == 4
  summary = profile_step.summarize(ops, steps=2, wall_s=0.001, top=2)
  assert summary["ops_per_step"] == 2
  assert summary["op_time_ms_per_step"] == pytest.approx(42 / 1e3 / 2)
  assert summary["busy_fraction_of_span"] == pytest.approx(39 / 70)
  assert [o["name"] for o in summary["top_ops"]] == ["reduce", "gemm_fusion"]
  assert summary["top_ops"][0]["calls_per_step"] == 0.5


def test_cpu_traces_count_xla_ops_but_not_runtime_bookkeeping():
  trace = [meta(1, "/host:CPU"), meta(1, "tf_XLAEigen/1", tid=7), meta(1, "python", tid=8),
           op(1, "fusion.3", 0, 4, tid=7), op(1, "ThunkExecutor::Execute", 0, 9, tid=7),
           op(1, "end: fusion.3", 4, 0, tid=7), op(1, "$builtins isinstance", 0, 1, tid=8),
           op(1, "dot.1", 5, 3, tid=7)]
  where, ops = profile_step.op_events(trace)
  assert where.startswith("host") and [e["name"] for e in ops] == ["fusion.3", "dot.1"]


def test_a_written_trace_is_found_and_read(tmp_path):
  folder = tmp_path / "plugins" / "profile" / "run"
  folder.mkdir(parents=True)
  with gzip.open(folder / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": GPU_TRACE}, f)
  assert profile_step.load_trace(str(tmp_path)) == GPU_TRACE
  with pytest.raises(FileNotFoundError, match="perfetto_trace"):
    profile_step.load_trace(str(tmp_path / "empty"))


@pytest.mark.parametrize("op_name, expected", [
    ("jit(train_step)/transpose(jvp(SequenceRecommender))/SequenceRecommender._facet_heads/"
     "fame_layer/vmap(heads)/blnm,bmk->blnk/dot_general", ("backward", "fame_layer/heads")),
    ("jit(train_step)/jvp(next_item_nll)/while/body/closed_call/krd,kvd->krv/dot_general",
     ("forward", "next_item_nll/krd,kvd->krv")),
    ("jit(train_step)/jvp(SequenceRecommender)/block_0/attention/jit(_where)/select_n",
     ("forward", "block_0/attention")),
    ("jit(train_step)/optimizer/cond/branch_1_fun/add", ("forward", "optimizer")),
    ("jit(train_step)/jvp()/reduce_max", ("forward", "(step)")),
])
def test_an_ops_scope_is_its_module_or_named_scope_without_transformations(op_name, expected):
  depth = expected[1].count("/") + 1
  assert profile_step.scope_of(op_name, depth) == expected


def test_a_scope_can_be_cut_to_its_first_names():
  name = "jit(f)/transpose(jvp(Model))/fame_layer/vmap(heads)/query/dot_general"
  assert profile_step.scope_of(name, 1) == ("backward", "fame_layer")
  assert profile_step.scope_of(name, 3) == ("backward", "fame_layer/heads/query")


def test_compiled_programs_are_attributed_to_their_named_scopes():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def loss(w, x):
    with jax.named_scope("loss"):
      y = jax.lax.scan(lambda c, xi: (c + jnp.dot(w, xi) ** 2, None), 0.0, x)[0]
    with jax.named_scope("tables"):
      return y + jnp.einsum("vd,d->v", jnp.tanh(x), w).sum()

  def step(w, x):
    g = jax.grad(loss)(w, x)
    with jax.named_scope("optimizer"):
      return w - 0.1 * g

  hlo = jax.jit(step).lower(jnp.ones(4), jnp.ones((3, 4))).compile().as_text()
  scopes = set(profile_step.op_scopes(hlo, depth=1).values())
  assert {("forward", "loss"), ("backward", "loss"), ("backward", "tables"),
          ("forward", "optimizer")} <= scopes
  assert {scope for _, scope in scopes} <= {"loss", "tables", "optimizer", "(step)",
                                            "(no metadata)"}


def test_op_time_is_summed_by_scope_and_pass():
  scopes = {"a": ("forward", "loss"), "b": ("backward", "loss"), "c": ("forward", "loss")}
  ops = [op(1, "a", 0, 10), op(1, "c", 10, 30), op(1, "b", 40, 5), op(1, "zzz", 50, 1),
         op(1, "a", 60, 10)]
  rows = profile_step.time_by_scope(ops, scopes, steps=2)
  assert [(r["scope"], r["direction"]) for r in rows] == [
      ("loss", "forward"), ("loss", "backward"), ("(not in the program)", "-")]
  assert rows[0]["ms_per_step"] == pytest.approx(50 / 1e3 / 2)
  assert rows[0]["ops_per_step"] == 1.5
