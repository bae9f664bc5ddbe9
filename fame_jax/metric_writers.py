"""Per-epoch metrics: appended to `<workdir>/metrics.jsonl` and to TensorBoard events."""

from __future__ import annotations

import json
import os
from typing import Any

import tensorboardX

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
  """Writes one JSON line and one set of TensorBoard scalars per record."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard")) if enabled else None

  def write(self, record: dict[str, Any]) -> None:
    """`record` holds "step" plus scalar metrics."""
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)):
        self._tb.add_scalar(key.replace("@", "_"), value, record["step"])  # TB tags: no "@".
    self._tb.flush()

  def truncate(self, after_epoch: int) -> None:
    """Drops the lines of epochs after `after_epoch` (a resumed run redoes them)."""
    if not self.enabled or not os.path.isfile(self.path):
      return
    records = read_metrics(os.path.dirname(self.path))
    kept = [r for r in records if r.get("epoch", 0) <= after_epoch]
    if len(kept) != len(records):
      with open(self.path + ".tmp", "w") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
      os.replace(self.path + ".tmp", self.path)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All records of a run's metrics.jsonl (empty if none)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
