"""Generated sequence tasks: ListOps (LRA rules), sequential digits, small Pathfinder."""

import time

import numpy as np
import pytest

from jaxlab import data
from jaxlab.data import digits, sequences


def _stack_eval(ids) -> int:
  """Independent ListOps evaluator over the token string (a stack machine, no trees)."""
  vocab = sequences.LISTOPS_VOCAB
  stack: list = []
  for i in ids:
    tok = vocab[int(i)]
    if tok == "<pad>":
      break
    if tok.startswith("["):
      stack.append([tok])
    elif tok == "]":
      op, *args = stack.pop()
      if op == "[MIN":
        v = min(args)
      elif op == "[MAX":
        v = max(args)
      elif op == "[MED":
        v = int(np.floor(np.median(args)))
      elif op == "[SM":
        v = sum(args) % 10
      else:
        raise AssertionError(op)
      if not stack:
        return v
      stack[-1].append(v)
    else:
      if not stack:
        return int(tok)
      stack[-1].append(int(tok))
  raise AssertionError("unterminated expression")


@pytest.fixture(scope="module")
def listops():
  cfg = dict(name="listops", max_length=96, min_length=16, train_size=300, validation_size=50, test_size=50,
             heldout_size=20, seed=3)
  return cfg, data.get_dataset(cfg)


def test_registered():
  assert {"listops", "seq_digits", "pathfinder"} <= set(data.names())


def test_listops_labels_equal_independent_evaluation(listops):
  _, ds = listops
  for split in ("train", "validation", "test", "heldout"):
    src = ds.split(split)
    x, y = src.arrays["inputs"], src.arrays["label"]
    assert [_stack_eval(row) for row in x] == y.tolist()
  assert ds.info["vocab_size"] == 16 and ds.info["pad_id"] == 0 and ds.info["seq_len"] == 96
  assert ds.num_classes == 10 and ds.input_shape == (96,) and ds.input_dtype == np.int32
  assert ds.info["split_sizes"] == {"test": 50, "validation": 50, "heldout": 20, "train": 300}


def test_listops_lengths_padding_and_uniqueness(listops):
  cfg, ds = listops
  x = np.concatenate([ds.split(s).arrays["inputs"] for s in ("train", "validation", "test", "heldout")])
  lengths = (x != 0).sum(1)
  assert lengths.min() > cfg["min_length"] and lengths.max() < cfg["max_length"]
  for row, n in zip(x[:50], lengths[:50], strict=True):  # padding only at the end, ends with ']'
    assert (row[:n] != 0).all() and (row[n:] == 0).all()
    assert sequences.LISTOPS_VOCAB[row[n - 1]] == "]" and sequences.LISTOPS_VOCAB[row[0]].startswith("[")
  assert len({tuple(r) for r in x}) == len(x)  # LRA keeps a set of trees
  assert set(np.unique(x)) <= set(range(16))


def test_listops_deterministic_per_seed():
  a = sequences.generate_listops(40, seed=1, min_length=10, max_length=60)
  b = sequences.generate_listops(40, seed=1, min_length=10, max_length=60)
  c = sequences.generate_listops(40, seed=2, min_length=10, max_length=60)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])


def test_listops_lra_length_2000():
  x, y = sequences.generate_listops(4, seed=0, min_length=500, max_length=2000)
  lengths = (x != 0).sum(1)
  assert x.shape == (4, 2000) and (lengths > 500).all() and (lengths < 2000).all()
  assert [_stack_eval(r) for r in x] == y.tolist()


def test_listops_median_rounds_down():
  # LRA: int(np.median) of an even count truncates the mean of the middle two.
  assert sequences._apply_op(sequences.MED, [1, 2]) == 1
  assert sequences._apply_op(sequences.MED, [3, 9, 0]) == 3
  assert sequences._apply_op(sequences.SUM_MOD, [7, 8, 9]) == 4


def test_smoke_generation_is_cheap():
  t = time.process_time()
  sequences.generate_listops(200, seed=11, min_length=8, max_length=64)
  sequences.generate_pathfinder(400, seed=11)
  assert time.process_time() - t < 2.0


def test_seq_digits_uses_digits_split():
  ds = data.get_dataset(dict(name="seq_digits"))
  x, y = digits.load_digits_arrays()
  idx = digits.split_indices(len(x))
  for split in ("train", "test", "validation", "heldout"):
    arr = ds.split(split).arrays
    np.testing.assert_array_equal(arr["label"], y[idx[split]])
    np.testing.assert_array_equal(arr["inputs"][:, :, 0], x[idx[split]].reshape(-1, 64))
  assert ds.input_shape == (64, 1) and ds.info["vocab_size"] == 0 and ds.info["input_channels"] == 1


def test_seq_digits_upsampled():
  ds = data.get_dataset(dict(name="seq_digits", upsample=4))
  x = ds.split("test").arrays["inputs"]
  assert x.shape == (360, 1024, 1) and ds.info["seq_len"] == 1024
  assert x.min() >= 0.0 and x.max() <= 1.0
  # Bilinear weights: rows sum to 1, and a constant image stays constant.
  m = sequences._resize_matrix(8, 32)
  np.testing.assert_allclose(m.sum(1), 1.0)
  np.testing.assert_allclose(sequences.upsample_images(np.full((1, 8, 8), 0.3), 4), 0.3, atol=1e-12)
  # Each upsampled image keeps the mean of its source (within interpolation error at the border).
  src = data.get_dataset(dict(name="seq_digits")).split("test").arrays["inputs"]
  assert np.abs(x.mean(1) - src.mean(1)).max() < 0.05


def test_pathfinder():
  cfg = dict(name="pathfinder", image_size=16, train_size=100, validation_size=20, test_size=20, heldout_size=0)
  ds = data.get_dataset(cfg)
  x, y = ds.split("train").arrays["inputs"], ds.split("train").arrays["label"]
  assert x.shape == (100, 256, 1) and ds.num_classes == 2 and ds.info["seq_len"] == 256
  assert set(np.unique(x)) <= {0.0, 1.0} and y.mean() == 0.5
  a, b = sequences.generate_pathfinder(30, seed=5), sequences.generate_pathfinder(30, seed=5)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[0], sequences.generate_pathfinder(30, seed=6)[0])
  # Every image carries two 2x2 markers: at least one fully lit 2x2 block.
  img = a[0].reshape(30, 16, 16)
  blocks = img[:, :-1, :-1] * img[:, 1:, :-1] * img[:, :-1, 1:] * img[:, 1:, 1:]
  assert (blocks.reshape(30, -1).max(1) == 1.0).all()


@pytest.mark.parametrize("cfg, match", [
    (dict(name="listops", max_length=50, min_length=60), "min_length"),
    (dict(name="listops", max_length=50, train_size=0), "train_size"),
    (dict(name="seq_digits", upsample=0), "upsample"),
    (dict(name="pathfinder", image_size=4), "image_size"),
])
def test_bad_configs(cfg, match):
  with pytest.raises(ValueError, match=match):
    data.get_dataset(cfg)


def test_listops_impossible_range_is_reported():
  with pytest.raises(ValueError, match="widen the length range"):
    sequences.generate_listops(5, seed=0, min_length=40, max_length=50, max_depth=2, max_args=3, max_tries=200)
