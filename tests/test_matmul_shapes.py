"""benchmarks/matmul_shapes.py: the output layer's matmul shapes, timed alone."""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import matmul_shapes  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_flops_are_twice_the_multiply_adds_of_each_einsum():
  args = matmul_shapes.argparse.Namespace(items=40, rows=6, dim=4, heads=2, users=3)
  for name, (spec, lhs, rhs, flops) in matmul_shapes.shapes(args).items():
    inputs, output = spec.split("->")
    sizes = {}
    for letters, shape in zip(inputs.split(","), (lhs, rhs)):
      for letter, size in zip(letters, shape):
        assert sizes.setdefault(letter, size) == size, (name, letter)
    assert flops == 2 * int(np.prod(list(sizes.values()))), name
    assert set(output) < set(sizes), name


def test_writes_every_shape_with_its_rate(tmp_path, monkeypatch, capsys):
  out = tmp_path / "shapes.json"
  monkeypatch.setattr(sys, "argv", ["matmul_shapes.py", "--items", "64", "--rows", "8",
                                    "--square", "32", "--repeats", "2", "--skip_torch",
                                    "--out", str(out)])
  matmul_shapes.main()
  result = json.loads(out.read_text())
  assert set(result["shapes"]) == {"loss_logits", "loss_du", "loss_dtable", "rank_logits", "square"}
  for row in result["shapes"].values():
    assert row["xla_ms"] > 0
    np.testing.assert_allclose(row["xla_gflops"], row["flops"] / row["xla_ms"] / 1e6, rtol=1e-9)
    assert "torch_ms" not in row
  assert "loss_du" in capsys.readouterr().out
