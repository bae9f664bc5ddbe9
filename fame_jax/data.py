"""Sequential-recommendation data: reading, leave-one-out split, batches.

File format (the S3-Rec / ICLRec files): one user per line, `user item item ...`,
items in chronological order, positive integer ids, item 0 reserved for padding.

Training batches are right-padded: position 0 holds a sequence's first item,
as in SASRec / RecBole, and every non-padding position carries the next item
as its target. A training sequence longer than `max_len` is cut into windows
so that every target is predicted exactly once (see `training_windows`; a
window's first targets see only the items since the window began). Batches are drawn in an order that is a pure
function of (seed, epoch), padded to one of a few static lengths.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import ml_collections
import numpy as np

MIN_ITEMS_PER_USER = 3
DATA_HELP = ("The four benchmark files (Beauty.txt, Sports_and_Outdoors.txt, Toys_and_Games.txt, "
             "Yelp.txt) are published in the data/ folder of the salesforce/ICLRec GitHub repository; "
             "put them in one folder and point FAME_DATA_DIR (or --config.data.dir) at it.")


class DataError(ValueError):
  """Malformed or missing data; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """User sequences (chronological item-id arrays) and the catalogue size."""
  name: str
  sequences: list[np.ndarray]
  num_items: int

  @property
  def num_users(self) -> int:
    return len(self.sequences)


def read_sequences(path: str) -> list[np.ndarray]:
  """Reads and strictly validates a `user item item ...` file."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: dataset file not found. {DATA_HELP}")
  sequences = []
  with open(path, "r", encoding="ascii", errors="strict") as f:
    try:
      lines = f.readlines()
    except UnicodeDecodeError as e:
      raise DataError(f"{path}: not an ASCII text file ({e})") from None
  for lineno, line in enumerate(lines, start=1):
    fields = line.split()
    if not fields:
      raise DataError(f"{path}:{lineno}: empty line")
    try:
      ids = [int(x) for x in fields]
    except ValueError:
      bad = next(x for x in fields if not _is_int(x))
      raise DataError(f"{path}:{lineno}: {bad!r} is not an integer id") from None
    if min(ids) <= 0:
      raise DataError(f"{path}:{lineno}: ids must be positive integers, got {min(ids)}")
    items = ids[1:]
    if len(items) < MIN_ITEMS_PER_USER:
      raise DataError(f"{path}:{lineno}: user {ids[0]} has {len(items)} items; "
                      f"leave-one-out needs at least {MIN_ITEMS_PER_USER}")
    sequences.append(np.asarray(items, dtype=np.int32))
  if not sequences:
    raise DataError(f"{path}: the file is empty")
  return sequences


def _is_int(text: str) -> bool:
  try:
    int(text)
    return True
  except ValueError:
    return False


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
  """The dataset named by `config.data.name` (a file in `config.data.dir`, or "synthetic")."""
  name = config.data.name
  if name == "synthetic":
    from fame_jax import synthetic  # pylint: disable=g-import-not-at-top
    sequences, num_items = synthetic.generate(config.data.synthetic, seed=config.seed)
    return Dataset(name, sequences, num_items)
  sequences = read_sequences(os.path.join(config.data.dir, f"{name}.txt"))
  return Dataset(name, sequences, int(max(s.max() for s in sequences)))


# ---------------------------------------------------------------------------
# Leave-one-out split.


@dataclasses.dataclass(frozen=True)
class EvalSplit:
  """Evaluation users: input histories, held-out targets, items to exclude."""
  histories: list[np.ndarray]  # Full history before the target.
  targets: np.ndarray  # [U] item ids.


def train_sequences(dataset: Dataset) -> list[np.ndarray]:
  """Training prefix of each user: all but the last two items."""
  return [s[:-2] for s in dataset.sequences]


def eval_split(dataset: Dataset, split: str) -> EvalSplit:
  """"valid": predict the second-to-last item; "test": predict the last item."""
  if split not in ("valid", "test"):
    raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
  cut = 2 if split == "valid" else 1
  return EvalSplit([s[:-cut] for s in dataset.sequences],
                   np.asarray([s[-cut] for s in dataset.sequences], dtype=np.int32))


# ---------------------------------------------------------------------------
# Training windows and batches.


@dataclasses.dataclass(frozen=True)
class Windows:
  """Right-padded training windows: inputs, targets (0 = no loss) and lengths."""
  inputs: np.ndarray  # [W, max_len] int32
  targets: np.ndarray  # [W, max_len] int32
  lengths: np.ndarray  # [W] int32, number of non-padding inputs

  @property
  def num_targets(self) -> int:
    return int((self.targets > 0).sum())


def training_windows(sequences: list[np.ndarray], max_len: int) -> Windows:
  """Next-item windows: every target of every sequence exactly once.

  A sequence `s` gives inputs `s[:-1]` and targets `s[1:]`. When there are more
  than `max_len` of them, windows end at max_len, 2 max_len, ... and at the
  end; each window is the `max_len` inputs before its end, and only targets not
  already covered by an earlier window keep a loss. The context of a target is
  the part of its window before it (the last window overlaps the one before, so
  its new targets see up to `max_len` items; a middle window starts afresh).
  """
  inputs, targets, lengths = [], [], []
  for seq in sequences:
    n = len(seq) - 1
    if n <= 0:
      continue
    ends = list(range(max_len, n, max_len)) + [n]
    covered = 0
    for end in ends:
      start = max(0, end - max_len)
      x = np.zeros(max_len, np.int32)
      y = np.zeros(max_len, np.int32)
      x[:end - start] = seq[start:end]
      y[:end - start] = seq[start + 1:end + 1]
      if covered > start:
        y[:covered - start] = 0  # Already predicted by the previous window.
      inputs.append(x)
      targets.append(y)
      lengths.append(end - start)
      covered = end
  if not inputs:
    raise DataError("no training targets: every user's training prefix has a single item")
  return Windows(np.stack(inputs), np.stack(targets), np.asarray(lengths, np.int32))


def bucket_lengths(length_buckets, max_len: int) -> tuple[int, ...]:
  """Sorted static lengths (0 in the config means max_len), capped at max_len."""
  sizes = sorted({max_len if b == 0 else min(int(b), max_len) for b in length_buckets} | {max_len})
  if sizes[0] <= 0:
    raise ValueError(f"config.data.length_buckets: lengths must be >= 0, got {length_buckets}")
  return tuple(sizes)


def fit_bucket(length: int, buckets: tuple[int, ...]) -> int:
  """The smallest bucket >= length."""
  for b in buckets:
    if length <= b:
      return b
  return buckets[-1]


def epoch_batch_indices(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                        pool_batches: int) -> list[np.ndarray]:
  """The epoch's batches as arrays of window indices; a pure function of (seed, epoch).

  Windows are shuffled, sorted by length inside pools of `pool_batches`
  batches (so a batch holds windows of similar length), cut into batches, and
  the batches shuffled. The last batch may be short.
  """
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(len(lengths))
  pool = max(1, pool_batches) * batch_size
  batches = []
  for start in range(0, len(order), pool):
    chunk = order[start:start + pool]
    if pool_batches > 1:
      chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
    batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
  return [batches[i] for i in rng.permutation(len(batches))]


def make_train_batch(windows: Windows, index: np.ndarray, batch_size: int,
                     buckets: tuple[int, ...]) -> dict[str, np.ndarray]:
  """A `[batch_size, bucket]` batch; rows beyond `len(index)` are empty padding."""
  length = fit_bucket(int(windows.lengths[index].max()), buckets)
  items = np.zeros((batch_size, length), np.int32)
  targets = np.zeros((batch_size, length), np.int32)
  items[:len(index)] = windows.inputs[index, :length]
  targets[:len(index)] = windows.targets[index, :length]
  return {"items": items, "targets": targets}


def pack_rows(lengths: np.ndarray, order: np.ndarray, row_len: int) -> list[np.ndarray]:
  """Best-fit-decreasing packing of the windows `order` into rows of `row_len` slots.

  Returns the rows as arrays of window indices. Ties in length keep the order
  of `order`, so a shuffled `order` gives a different packing.
  """
  by_length = order[np.argsort(-lengths[order], kind="stable")]
  rows_with_room: list[list[int]] = [[] for _ in range(row_len + 1)]  # by free slots
  rows: list[list[int]] = []
  for w in by_length:
    need = int(lengths[w])
    for room in range(need, row_len + 1):
      if rows_with_room[room]:
        row = rows_with_room[room].pop()
        break
    else:
      row, room = len(rows), row_len
      rows.append([])
    rows[row].append(int(w))
    rows_with_room[room - need].append(row)
  return [np.asarray(r, np.int64) for r in rows]


def rows_per_packed_batch(windows: Windows, batch_size: int, row_len: int, multiple: int) -> int:
  """Rows that hold `batch_size` windows of average length, rounded up to `multiple`."""
  rows = -(-batch_size * float(windows.lengths.mean()) // row_len)
  return int(max(multiple, -(-rows // multiple) * multiple))


def epoch_packed_rows(lengths: np.ndarray, rows_per_batch: int, row_len: int, seed: int,
                      epoch: int) -> list[list[np.ndarray]]:
  """The epoch's packed batches (each a list of rows of window indices); pure in (seed, epoch)."""
  rng = np.random.default_rng([seed, epoch])
  rows = pack_rows(lengths, rng.permutation(len(lengths)), row_len)
  rows = [rows[i] for i in rng.permutation(len(rows))]
  return [rows[i:i + rows_per_batch] for i in range(0, len(rows), rows_per_batch)]


@dataclasses.dataclass(frozen=True)
class PackedLayout:
  """Where the tokens of sequences packed end to end into rows go (numpy, no Python loop).

  For rows `[[a, b], [c]]` of sequence indices, sequence a starts row 0 at
  column 0, b follows it, c starts row 1. Per sequence: `index` (the sequence
  indices, in row order), `row`, `start` column, `segment` (1-based within its
  row); per token: `token_sequence` (position in `index`), `token_position`
  (0-based within its sequence) and `token_slot` (row, column arrays).
  """
  index: np.ndarray
  row: np.ndarray
  start: np.ndarray
  segment: np.ndarray
  token_sequence: np.ndarray
  token_position: np.ndarray
  token_slot: tuple[np.ndarray, np.ndarray]

  @classmethod
  def of(cls, rows: list[np.ndarray], lengths: np.ndarray) -> "PackedLayout":
    sizes = np.array([len(r) for r in rows], np.int64)
    index = np.concatenate(rows).astype(np.int64) if len(rows) else np.zeros(0, np.int64)
    n = lengths[index].astype(np.int64)
    row = np.repeat(np.arange(len(rows)), sizes)
    first = np.cumsum(sizes) - sizes  # Position in `index` of each row's first sequence.
    before = np.cumsum(n) - n  # Tokens of all earlier sequences.
    start = before - before[first][row]
    segment = np.arange(len(index)) - first[row] + 1
    token_sequence = np.repeat(np.arange(len(index)), n)
    token_position = np.arange(int(n.sum())) - np.repeat(before, n)
    return cls(index, row, start, segment, token_sequence, token_position,
               (row[token_sequence], start[token_sequence] + token_position))


def make_packed_batch(windows: Windows, rows: list[np.ndarray], rows_per_batch: int,
                      row_len: int) -> dict[str, np.ndarray]:
  """A `[rows_per_batch, row_len]` batch of windows packed end to end.

  `segments` numbers the windows of a row (0 = padding) and `positions` restarts
  at 0 for each window, so the model attends within a window only.
  """
  batch = {k: np.zeros((rows_per_batch, row_len), np.int32)
           for k in ("items", "targets", "segments", "positions")}
  layout = PackedLayout.of(rows, windows.lengths)
  source = (layout.index[layout.token_sequence], layout.token_position)
  batch["items"][layout.token_slot] = windows.inputs[source]
  batch["targets"][layout.token_slot] = windows.targets[source]
  batch["segments"][layout.token_slot] = layout.segment[layout.token_sequence]
  batch["positions"][layout.token_slot] = layout.token_position
  return batch


def stack_batches(batches: list[dict[str, np.ndarray]], steps: int) -> dict[str, np.ndarray]:
  """1 to `steps` batches of one shape stacked `[steps, ...]`, padded with all-zero batches."""
  if not 1 <= len(batches) <= steps:
    raise ValueError(f"stack_batches: {len(batches)} batches for {steps} steps")
  padding = steps - len(batches)
  return {k: np.stack([b[k] for b in batches] + [np.zeros_like(batches[0][k])] * padding)
          for k in batches[0]}


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """How an epoch's windows become fixed-shape batches (packed or length-bucketed)."""
  windows: Windows
  batch_size: int  # Sequences per bucketed batch (the target mean when packing).
  max_len: int
  buckets: tuple[int, ...]
  pool_batches: int
  packing: bool
  rows_per_batch: int  # Rows of a packed batch.

  @classmethod
  def create(cls, windows: Windows, config: ml_collections.ConfigDict,
             row_multiple: int = 1) -> "BatchPlan":
    max_len = config.data.max_len
    rows = rows_per_packed_batch(windows, config.batch_size, max_len, row_multiple)
    return cls(windows, config.batch_size, max_len,
               bucket_lengths(config.data.length_buckets, max_len),
               config.data.bucket_pool_batches, bool(config.data.packing), rows)

  def epoch_groups(self, seed: int, epoch: int) -> list:
    """The epoch's batches as groups of window indices (rows of them when packing)."""
    if self.packing:
      return epoch_packed_rows(self.windows.lengths, self.rows_per_batch, self.max_len, seed,
                               epoch)
    return epoch_batch_indices(self.windows.lengths, self.batch_size, seed, epoch,
                               self.pool_batches)

  def make_batch(self, group) -> dict[str, np.ndarray]:
    if self.packing:
      return make_packed_batch(self.windows, group, self.rows_per_batch, self.max_len)
    batch = make_train_batch(self.windows, group, self.batch_size, self.buckets)
    length = batch["items"].shape[1]
    batch["segments"] = (batch["items"] > 0).astype(np.int32)
    batch["positions"] = np.broadcast_to(np.arange(length, dtype=np.int32),
                                         batch["items"].shape).copy()
    return batch

  def stacked_batch(self, groups: list, steps: int) -> dict[str, np.ndarray]:
    """The batches of `groups` stacked, `[steps, rows, length]` (several: packed batches only).

    Calls of fewer than `steps` batches are padded with all-zero batches: no
    targets, so `train_lib.train_step` leaves the state unchanged.
    """
    if steps > 1 and not self.packing:
      raise ValueError(f"stacked_batch: {steps} steps of unpacked batches (their lengths differ)")
    return stack_batches([self.make_batch(g) for g in groups], steps)

  def batches(self, seed: int, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """The epoch's batches from batch `start_step` on (for an exact resume)."""
    for group in self.epoch_groups(seed, epoch)[start_step:]:
      yield self.make_batch(group)

  def steps_per_epoch(self, seed: int = 0, epoch: int = 0) -> int:
    return len(self.epoch_groups(seed, epoch))


# ---------------------------------------------------------------------------
# Evaluation batches.


@dataclasses.dataclass(frozen=True)
class EvalData:
  """Padded evaluation inputs, sorted by history length (for bucketing)."""
  items: np.ndarray  # [U, max_len] last max_len history items, right-padded
  lengths: np.ndarray  # [U]
  targets: np.ndarray  # [U]
  exclude: np.ndarray  # [U, X] unique history items to drop from the ranking, 0-padded


def eval_data(split: EvalSplit, max_len: int, exclude_history: bool,
              exclude_width: int = 0) -> EvalData:
  """The split's histories (last `max_len` items), targets and items to exclude.

  `exclude` is `[users, W]`, W the most distinct items in a history, or
  `exclude_width` if that is more (another split's: one shape for both).
  """
  histories = split.histories
  num = len(histories)
  items = np.zeros((num, max_len), np.int32)
  lengths = np.zeros(num, np.int32)
  for u, h in enumerate(histories):
    recent = h[-max_len:]
    items[u, :len(recent)] = recent
    lengths[u] = len(recent)
  if exclude_history:
    uniques = [np.unique(h) for h in histories]
    width = max(max(len(x) for x in uniques), exclude_width)
    exclude = np.zeros((num, width), np.int32)
    for u, x in enumerate(uniques):
      exclude[u, :len(x)] = x
  else:
    exclude = np.zeros((num, 1), np.int32)
  return EvalData(items, lengths, split.targets.astype(np.int32), exclude)


def eval_batches(data: EvalData, batch_size: int,
                 buckets: tuple[int, ...]) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
  """Yields (batch, user indices of its real rows); users sorted by length, padded to a bucket."""
  order = np.argsort(data.lengths, kind="stable")
  for start in range(0, len(order), batch_size):
    index = order[start:start + batch_size]
    n = len(index)
    length = fit_bucket(int(data.lengths[index].max()), buckets)
    batch = {
        "items": np.zeros((batch_size, length), np.int32),
        "lengths": np.ones(batch_size, np.int32),
        "targets": np.ones(batch_size, np.int32),
        "exclude": np.zeros((batch_size, data.exclude.shape[1]), np.int32),
    }
    batch["items"][:n] = data.items[index, :length]
    batch["items"][n:, 0] = 1  # Padding rows: a dummy one-item history, results dropped.
    batch["lengths"][:n] = data.lengths[index]
    batch["targets"][:n] = data.targets[index]
    batch["exclude"][:n] = data.exclude[index]
    yield batch, index


def packed_eval_batches(data: EvalData, batch_size: int, row_multiple: int = 1,
                        rows: int | None = None
                        ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
  """Yields (batch, user indices of its first slots): histories packed end to end into rows.

  Users are dealt round-robin by length into `ceil(U / batch_size)` batches, so
  every batch holds a similar mix of lengths, and each batch's histories are
  packed best-fit into rows of `max_len` slots. All batches then share one
  shape, `[rows, max_len]` with `rows` the most any batch needs (rounded up to
  `row_multiple`), so evaluation compiles once and runs on ~real tokens only.
  Given `rows` (another split's, a multiple of `row_multiple`), the batches
  take exactly that many, users being dealt into more batches if they need
  more, so that one compiled program ranks both splits.
  `user_rows` / `user_columns` `[batch_size]` locate each user's last item;
  slots past the batch's users point at row 0, column 0 and are dropped.
  """
  num, row_len = data.items.shape
  num_batches = -(-num // batch_size)
  by_length = np.argsort(-data.lengths, kind="stable")
  while True:
    groups = [by_length[b::num_batches] for b in range(num_batches)]
    packed = [pack_rows(data.lengths, group, row_len) for group in groups]
    need = max(len(p) for p in packed)
    if rows is None or need <= rows:
      break
    num_batches = max(num_batches + 1, -(-num_batches * need // rows))  # A user needs one row.
  rows = -(-need // row_multiple) * row_multiple if rows is None else rows
  for packing in packed:
    batch = {k: np.zeros((rows, row_len), np.int32) for k in ("items", "segments", "positions")}
    batch["user_rows"] = np.zeros(batch_size, np.int32)
    batch["user_columns"] = np.zeros(batch_size, np.int32)
    layout = PackedLayout.of(packing, data.lengths)
    index = layout.index
    batch["items"][layout.token_slot] = data.items[index[layout.token_sequence],
                                                   layout.token_position]
    batch["segments"][layout.token_slot] = layout.segment[layout.token_sequence]
    batch["positions"][layout.token_slot] = layout.token_position
    batch["user_rows"][:len(index)] = layout.row
    batch["user_columns"][:len(index)] = layout.start + data.lengths[index] - 1
    batch["targets"] = np.ones(batch_size, np.int32)
    batch["targets"][:len(index)] = data.targets[index]
    batch["exclude"] = np.zeros((batch_size, data.exclude.shape[1]), np.int32)
    batch["exclude"][:len(index)] = data.exclude[index]
    yield batch, index
