"""Reading, the leave-one-out split, training windows and batch order."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest

from conftest import load_config
from conftest import random_sequences
from fame_jax import data as data_lib

MAX_LEN = 5


def unique_item_sequences(lengths) -> list[np.ndarray]:
  """User u's items are 1000 u + 1, 1000 u + 2, ...: an id tells (user, position)."""
  return [np.arange(1, n + 1, dtype=np.int32) + 1000 * u for u, n in enumerate(lengths)]


# Lengths around multiples of MAX_LEN: after dropping the two held-out items a
# sequence has n = len - 3 targets; n = 0, 1, 4, 5, 6, 9, 10, 11, 16.
LENGTHS = [3, 4, 7, 8, 9, 12, 13, 14, 19]


def test_leave_one_out_split():
  sequences = unique_item_sequences(LENGTHS)
  dataset = data_lib.Dataset("t", sequences, num_items=int(max(s.max() for s in sequences)))
  train = data_lib.train_sequences(dataset)
  valid = data_lib.eval_split(dataset, "valid")
  test = data_lib.eval_split(dataset, "test")
  for u, s in enumerate(sequences):
    np.testing.assert_array_equal(train[u], s[:-2])
    np.testing.assert_array_equal(valid.histories[u], s[:-2])
    assert valid.targets[u] == s[-2]
    np.testing.assert_array_equal(test.histories[u], s[:-1])
    assert test.targets[u] == s[-1]
  with pytest.raises(ValueError):
    data_lib.eval_split(dataset, "train")


def test_training_windows_keep_every_target_exactly_once():
  """Multiset of (user, position, target) equals the brute-force list, with real context."""
  sequences = unique_item_sequences(LENGTHS)
  dataset = data_lib.Dataset("t", sequences, num_items=20000)
  windows = data_lib.training_windows(data_lib.train_sequences(dataset), MAX_LEN)

  expected = collections.Counter(
      (u, p, int(s[p])) for u, s in enumerate(sequences) for p in range(1, len(s) - 2))
  got = collections.Counter()
  for x, y, length in zip(windows.inputs, windows.targets, windows.lengths):
    assert (x[:length] > 0).all() and (x[length:] == 0).all() and (y[length:] == 0).all()
    for j in np.flatnonzero(y):
      u, p = divmod(int(x[j]) - 1, 1000)  # x[j] is the item at 0-based position p.
      s = sequences[u]
      got[(u, p + 1, int(y[j]))] += 1
      assert y[j] == s[p + 1]
      # The context is the contiguous history right before the target.
      np.testing.assert_array_equal(x[:j + 1], s[p - j:p + 1])
  assert got == expected
  assert windows.num_targets == sum(expected.values())
  # The most recent training target of every user sees as much history as fits.
  for u, s in enumerate(sequences):
    n = len(s) - 3
    if n <= 0:
      continue
    last = [w for w in range(len(windows.lengths))
            if (windows.targets[w] == s[n]).any()]
    assert len(last) == 1
    assert windows.lengths[last[0]] == min(n, MAX_LEN)


def test_training_windows_random_sequences_brute_force():
  rng = np.random.default_rng(0)
  sequences = random_sequences(rng, 40, 9, 2, 4 * MAX_LEN + 3)  # Items repeat here.
  windows = data_lib.training_windows(sequences, MAX_LEN)
  expected = collections.Counter(int(x) for s in sequences for x in s[1:])
  got = collections.Counter(int(x) for x in windows.targets[windows.targets > 0])
  assert got == expected
  # Every (input, target) pair is a consecutive pair of some sequence.
  pairs = collections.Counter((int(a), int(b)) for s in sequences for a, b in zip(s[:-1], s[1:]))
  got_pairs = collections.Counter(
      (int(a), int(b)) for x, y in zip(windows.inputs, windows.targets)
      for a, b in zip(x, y) if b > 0)
  assert got_pairs == pairs


def test_training_windows_without_any_target_raise():
  with pytest.raises(data_lib.DataError):
    data_lib.training_windows([np.array([4], np.int32), np.array([2], np.int32)], MAX_LEN)


@pytest.mark.parametrize("pool_batches", [1, 3])
def test_epoch_batches_cover_every_window_once_and_depend_only_on_seed_and_epoch(pool_batches):
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 51, 103)
  batch_size = 8

  def flat(seed, epoch):
    batches = data_lib.epoch_batch_indices(lengths, batch_size, seed, epoch, pool_batches)
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert sum(len(b) < batch_size for b in batches) <= 1
    assert len(batches) == -(-len(lengths) // batch_size)
    return [list(map(int, b)) for b in batches]

  for epoch in range(3):
    batches = flat(7, epoch)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert batches == flat(7, epoch)  # Pure function of (seed, epoch).
  assert flat(7, 0) != flat(7, 1)
  assert flat(7, 0) != flat(8, 0)


def test_length_pools_give_batches_of_similar_length():
  rng = np.random.default_rng(1)
  lengths = rng.integers(1, 51, 256)

  def mean_spread(pool_batches):
    batches = data_lib.epoch_batch_indices(lengths, 16, 0, 0, pool_batches)
    return np.mean([np.ptp(lengths[b]) for b in batches])

  assert mean_spread(16) < 0.5 * mean_spread(1)


def plan_for(windows, packing: bool, batch_size: int = 8, max_len: int = 20,
             row_multiple: int = 4) -> data_lib.BatchPlan:
  config = load_config("default")
  config.data.max_len = max_len
  config.data.length_buckets = (8, 0)
  config.data.bucket_pool_batches = 2
  config.data.packing = packing
  config.batch_size = batch_size
  return data_lib.BatchPlan.create(windows, config, row_multiple=row_multiple)


def windows_in_batch(batch) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
  """The (inputs, targets) windows of a batch, read back through `segments`."""
  out = []
  for items, targets, segments, positions in zip(batch["items"], batch["targets"],
                                                 batch["segments"], batch["positions"]):
    assert (items[segments == 0] == 0).all() and (targets[segments == 0] == 0).all()
    for seg in np.unique(segments[segments > 0]):
      where = np.flatnonzero(segments == seg)
      assert (np.diff(where) == 1).all()  # A window is contiguous ...
      np.testing.assert_array_equal(positions[where], np.arange(len(where)))  # ... from position 0.
      out.append((tuple(items[where]), tuple(targets[where])))
  return out


@pytest.mark.parametrize("packing", [False, True])
def test_batch_plan_trains_on_every_window_once_per_epoch(packing):
  rng = np.random.default_rng(2)
  windows = data_lib.training_windows(random_sequences(rng, 60, 50, 2, 45), 20)
  plan = plan_for(windows, packing)
  expected = collections.Counter(
      (tuple(x[:n]), tuple(y[:n])) for x, y, n in zip(windows.inputs, windows.targets, windows.lengths))
  for epoch in range(2):
    batches = list(plan.batches(seed=3, epoch=epoch))
    assert len(batches) == plan.steps_per_epoch(3, epoch)
    got = collections.Counter(w for b in batches for w in windows_in_batch(b))
    assert got == expected
    for b in batches:
      assert set(b) >= {"items", "targets", "segments", "positions"}
      if packing:  # One static shape, rows a multiple of the data-parallel devices.
        assert b["items"].shape == (plan.rows_per_batch, 20)
        assert plan.rows_per_batch % 4 == 0
      else:
        assert b["items"].shape[0] == 8 and b["items"].shape[1] in (8, 20)
        lengths = (b["items"] > 0).sum(1)
        assert b["items"].shape[1] == data_lib.fit_bucket(int(lengths.max()), (8, 20))
  # Resuming mid-epoch yields exactly the remaining batches.
  full = list(plan.batches(seed=3, epoch=1))
  resumed = list(plan.batches(seed=3, epoch=1, start_step=2))
  assert len(resumed) == len(full) - 2
  for a, b in zip(full[2:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_packed_epochs_depend_only_on_seed_and_epoch():
  rng = np.random.default_rng(4)
  lengths = rng.integers(1, 21, 150)

  def rows(seed, epoch):
    groups = data_lib.epoch_packed_rows(lengths, 4, 20, seed, epoch)
    flat = [r.tolist() for g in groups for r in g]
    assert all(lengths[r].sum() <= 20 for r in flat)  # Rows never overflow.
    assert sorted(w for r in flat for w in r) == list(range(150))
    assert all(1 <= len(g) <= 4 for g in groups)
    return flat

  assert rows(0, 0) == rows(0, 0)
  assert rows(0, 0) != rows(0, 1)
  assert rows(0, 0) != rows(1, 0)


def test_packed_batch_equals_an_explicit_slot_by_slot_packing():
  rng = np.random.default_rng(6)
  lengths = rng.integers(1, 13, 40).astype(np.int32)
  inputs = np.zeros((40, 12), np.int32)
  targets = np.zeros((40, 12), np.int32)
  for w, n in enumerate(lengths):
    inputs[w, :n] = rng.integers(1, 99, n)
    targets[w, :n] = rng.integers(0, 99, n)
  windows = data_lib.Windows(inputs, targets, lengths)
  rows = data_lib.pack_rows(lengths, rng.permutation(40), 12)
  batch = data_lib.make_packed_batch(windows, rows, len(rows) + 2, 12)  # Two empty rows.
  expected = {k: np.zeros((len(rows) + 2, 12), np.int32)
              for k in ("items", "targets", "segments", "positions")}
  for r, row in enumerate(rows):
    column = 0
    for segment, w in enumerate(row, start=1):
      for position in range(lengths[w]):
        expected["items"][r, column] = inputs[w, position]
        expected["targets"][r, column] = targets[w, position]
        expected["segments"][r, column] = segment
        expected["positions"][r, column] = position
        column += 1
  for key, value in expected.items():
    np.testing.assert_array_equal(batch[key], value, err_msg=key)


def test_eval_data_and_batches_cover_every_user_once():
  rng = np.random.default_rng(3)
  sequences = random_sequences(rng, 13, 9, 3, 30)  # Items repeat (Yelp-like).
  dataset = data_lib.Dataset("t", sequences, 9)
  split = data_lib.eval_split(dataset, "test")
  data = data_lib.eval_data(split, max_len=10, exclude_history=True)
  for u, h in enumerate(split.histories):
    recent = h[-10:]
    np.testing.assert_array_equal(data.items[u, :len(recent)], recent)
    assert (data.items[u, len(recent):] == 0).all()
    listed = data.exclude[u][data.exclude[u] > 0]
    assert set(listed) == set(h)  # The whole history, not just L.
    assert len(listed) == len(set(listed))  # Each once: evaluation ranks rely on it.
  assert (data_lib.eval_data(split, 10, exclude_history=False).exclude == 0).all()
  seen = []
  for batch, index in data_lib.eval_batches(data, 4, (4, 10)):
    assert batch["items"].shape[0] == 4
    np.testing.assert_array_equal(batch["targets"][:len(index)], data.targets[index])
    np.testing.assert_array_equal(batch["lengths"][:len(index)], data.lengths[index])
    seen.extend(index.tolist())
  assert sorted(seen) == list(range(13))


def test_packed_eval_batches_hold_every_history_once_at_one_shape():
  rng = np.random.default_rng(5)
  sequences = random_sequences(rng, 41, 30, 3, 14)  # Some histories longer than max_len.
  split = data_lib.eval_split(data_lib.Dataset("t", sequences, 30), "valid")
  data = data_lib.eval_data(split, max_len=10, exclude_history=True)
  batches = list(data_lib.packed_eval_batches(data, 8, row_multiple=2))
  assert len(batches) == 6  # ceil(41 / 8)
  assert len({b["items"].shape for b, _ in batches}) == 1  # One compiled shape.
  rows = batches[0][0]["items"].shape[0]
  assert rows % 2 == 0 and rows < 8  # Fewer rows than the 8 users a padded batch has.
  seen = []
  for batch, index in batches:
    assert batch["user_rows"].shape == batch["targets"].shape == (8,)
    for slot, u in enumerate(index):
      r, c = batch["user_rows"][slot], batch["user_columns"][slot]
      segment = batch["segments"][r, c]
      history = batch["items"][r][batch["segments"][r] == segment]
      np.testing.assert_array_equal(history, data.items[u, :data.lengths[u]])  # Whole, in order.
      assert c == np.flatnonzero(batch["segments"][r] == segment)[-1]  # Its last item.
      np.testing.assert_array_equal(batch["positions"][r][batch["segments"][r] == segment],
                                    np.arange(data.lengths[u]))
      assert batch["targets"][slot] == data.targets[u]
      np.testing.assert_array_equal(batch["exclude"][slot], data.exclude[u])
    assert batch["items"][batch["segments"] == 0].sum() == 0  # Padding holds no items.
    seen.extend(index.tolist())
  assert sorted(seen) == list(range(41))


def test_test_batches_can_take_the_validation_batches_shape():
  """Given the validation batches' rows (and exclude width), the test split's longer
  histories are dealt into more batches of that shape: one compiled program for both."""
  rng = np.random.default_rng(6)
  dataset = data_lib.Dataset("t", random_sequences(rng, 60, 30, 3, 14), 30)
  valid_split, test_split = (data_lib.eval_split(dataset, s) for s in ("valid", "test"))
  width = data_lib.eval_data(test_split, 10, exclude_history=True).exclude.shape[1]
  valid = data_lib.eval_data(valid_split, 10, exclude_history=True, exclude_width=width)
  test = data_lib.eval_data(test_split, 10, exclude_history=True, exclude_width=width)
  assert valid.exclude.shape == test.exclude.shape
  valid_batches = list(data_lib.packed_eval_batches(valid, 16, row_multiple=2))
  rows = valid_batches[0][0]["items"].shape[0]
  free = list(data_lib.packed_eval_batches(test, 16, row_multiple=2))
  assert free[0][0]["items"].shape[0] > rows  # Left alone, test batches need more rows.
  fitted = list(data_lib.packed_eval_batches(test, 16, row_multiple=2, rows=rows))
  assert len(fitted) > len(free) == len(valid_batches)
  shapes = {k: v.shape for k, v in valid_batches[0][0].items()}
  seen = []
  for batch, index in fitted:
    assert {k: v.shape for k, v in batch.items()} == shapes
    for slot, u in enumerate(index):
      r, c = batch["user_rows"][slot], batch["user_columns"][slot]
      segment = batch["segments"][r] == batch["segments"][r, c]
      np.testing.assert_array_equal(batch["items"][r][segment], test.items[u, :test.lengths[u]])
    seen.extend(index.tolist())
  assert sorted(seen) == list(range(60))


def test_good_file_round_trips(write_dataset, tmp_path):
  sequences = [np.array([3, 1, 4, 1, 5]), np.array([9, 2, 6]), np.array([5, 3, 5, 8])]
  write_dataset("Tiny", sequences)
  config = load_config("default")
  config.data.dir = str(tmp_path)
  config.data.name = "Tiny"
  dataset = data_lib.load_dataset(config)
  assert dataset.num_users == 3 and dataset.num_items == 9
  for a, b in zip(dataset.sequences, sequences):
    np.testing.assert_array_equal(a, b)


BAD_FILES = [
    pytest.param("1 3 4 5\n2 7 x8 9\n", 2, "x8", id="letters"),
    pytest.param("1 3 4 5\n2 7 8 9\n3 4 0 6\n", 3, "positive", id="zero_item"),
    pytest.param("1 3 4 5\n2 7 -8 9 10\n", 2, "positive", id="negative_item"),
    pytest.param("1 3 4 5\n2 7 8\n3 1 2 3\n", 2, "2 items", id="too_few_items"),
    pytest.param("1 3 4 5\n\n2 7 8 9\n", 2, "empty", id="blank_line"),
    pytest.param("1 3 4 5\n2 7 8 9.5\n", 2, "9.5", id="float"),
]


@pytest.mark.parametrize("text,line,why", BAD_FILES)
def test_bad_files_raise_data_error_naming_file_and_line(write_dataset, tmp_path, text, line, why):
  path = write_dataset("Bad", text)
  config = load_config("default")
  config.data.dir = str(tmp_path)
  config.data.name = "Bad"
  with pytest.raises(data_lib.DataError) as e:
    data_lib.load_dataset(config)
  message = str(e.value)
  assert f"{path}:{line}:" in message
  assert why in message


def test_empty_file_raises_data_error(write_dataset):
  path = write_dataset("Empty", "")
  with pytest.raises(data_lib.DataError, match="empty") as e:
    data_lib.read_sequences(path)
  assert path in str(e.value)


def test_missing_file_points_at_fame_data_dir(tmp_path):
  config = load_config("beauty")
  config.data.dir = str(tmp_path / "nowhere")
  with pytest.raises(data_lib.DataError) as e:
    data_lib.load_dataset(config)
  assert os.path.join(str(tmp_path / "nowhere"), "Beauty.txt") in str(e.value)
  assert "FAME_DATA_DIR" in str(e.value)


def test_synthetic_data_is_deterministic_and_valid():
  config = load_config("synthetic")
  config.data.synthetic.num_users = 50
  a = data_lib.load_dataset(config)
  b = data_lib.load_dataset(config)
  assert a.num_users == 50 and a.num_items == config.data.synthetic.num_items
  for s, t in zip(a.sequences, b.sequences):
    np.testing.assert_array_equal(s, t)
    assert len(s) >= data_lib.MIN_ITEMS_PER_USER
    assert s.min() >= 1 and s.max() <= a.num_items
  config.seed += 1
  c = data_lib.load_dataset(config)
  assert any(len(s) != len(t) or (s != t).any() for s, t in zip(a.sequences, c.sequences))
