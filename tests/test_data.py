import numpy as np
import pytest

from jaxlab import data


@pytest.fixture(scope="module")
def digits():
  return data.get_dataset({"name": "digits"})


def test_digits_split_sizes_disjoint_and_complete(digits):
  from jaxlab.data import digits as dmod
  idx = dmod.split_indices(1797)
  sizes = {k: len(v) for k, v in idx.items()}
  assert sizes == {"test": 360, "validation": 180, "heldout": 180, "train": 1077}
  allidx = np.concatenate(list(idx.values()))
  assert len(np.unique(allidx)) == 1797
  assert digits.num_examples("train") == 1077
  b = digits.sample_batch(4)
  assert b["inputs"].shape == (4, 8, 8, 1) and b["inputs"].dtype == np.float32
  assert 0.0 <= b["inputs"].min() and b["inputs"].max() <= 1.0


def test_train_batches_deterministic_and_cover_epoch(digits):
  a = digits.train_batch(5, 32, seed=3)
  b = digits.train_batch(5, 32, seed=3)
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  per_epoch = 1077 // 32
  idx = np.concatenate([digits.train_indices(s, 32, 3) for s in range(per_epoch)])
  assert len(np.unique(idx)) == per_epoch * 32
  # process shards concatenate to the global batch
  p0 = digits.train_batch(2, 32, 0, process_index=0, process_count=2)
  p1 = digits.train_batch(2, 32, 0, process_index=1, process_count=2)
  g = digits.train_batch(2, 32, 0)
  np.testing.assert_array_equal(np.concatenate([p0["label"], p1["label"]]), g["label"])


def test_eval_batches_exact_with_padding(digits):
  batches = list(digits.eval_batches("test", 100))
  assert [len(b["label"]) for b in batches] == [100] * 4
  assert sum(b["mask"].sum() for b in batches) == 360
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  np.testing.assert_array_equal(labels, digits.split("test").arrays["label"])


def test_unknown_dataset_error():
  with pytest.raises(ValueError, match="config.data.name: unknown data set 'nope'"):
    data.get_dataset({"name": "nope"})


def test_augment_shift_keeps_shape_and_changes_pixels():
  ds = data.get_dataset({"name": "digits", "aug_shift": 1})
  raw = data.get_dataset({"name": "digits"})
  a, r = ds.train_batch(0, 64, 0), raw.train_batch(0, 64, 0)
  assert a["inputs"].shape == r["inputs"].shape
  np.testing.assert_array_equal(a["label"], r["label"])
  assert not np.allclose(a["inputs"], r["inputs"])


def test_tfds_mock_data_path(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  cfg = {"name": "tfds", "tfds_name": "mnist", "split_map": {"train": "train", "test": "test"}}
  with tfds.testing.mock_data(num_examples=40):
    ds = data.get_dataset(cfg)
    assert ds.num_classes == 10 and ds.input_shape == (28, 28, 1)
    b = ds.train_batch(0, 8, seed=0)
    assert b["inputs"].shape == (8, 28, 28, 1) and b["label"].shape == (8,)
    assert b["inputs"].dtype == np.float32 and b["inputs"].max() <= 1.0
    n = sum(bb["mask"].sum() for bb in ds.eval_batches("test", 16))
    assert n == 40


def test_tfds_unprepared_error(tmp_path):
  cfg = {"name": "tfds", "tfds_name": "mnist", "data_dir": str(tmp_path)}
  with pytest.raises(FileNotFoundError, match="tfds build mnist"):
    data.get_dataset(cfg)
