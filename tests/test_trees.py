import numpy as np
import pytest

from jaxlab import trees

TREE = {"params": {"blocks": {"mlp": {"kernel": np.ones((2, 3)), "bias": np.zeros(3)}}, "head": {"kernel": np.eye(2)}}}


def test_flatten_unflatten_roundtrip():
  flat = trees.flatten(TREE)
  assert list(flat) == ["params/blocks/mlp/bias", "params/blocks/mlp/kernel", "params/head/kernel"]
  back = trees.unflatten(flat)
  assert trees.allclose(back, TREE)


def test_select_first_match_and_rules():
  assert sorted(trees.select(TREE, [r".*kernel"])) == ["params/blocks/mlp/kernel", "params/head/kernel"]
  vals = trees.flatten(trees.map_with_rules(TREE, [(r".*head.*", 0.0), (r".*kernel", 2.0)], 1.0))
  assert vals == {"params/blocks/mlp/bias": 1.0, "params/blocks/mlp/kernel": 2.0, "params/head/kernel": 0.0}
  assert trees.count(TREE) == 6 + 3 + 4


def test_merge_reports_all_differences():
  inited = {"a": np.zeros(2), "b": np.zeros((2, 2)), "c": np.zeros(1)}
  loaded = {"a": np.ones(2), "b": np.ones((3, 2)), "d": np.ones(1)}
  with pytest.raises(trees.TreeMismatchError) as e:
    trees.merge(loaded, inited)
  msg = str(e.value)
  assert "missing c" in msg and "shape of b" in msg and "unexpected d" in msg
  merged = trees.merge(loaded, inited, dont_load=["b", "d"], allow_missing=True)
  np.testing.assert_array_equal(merged["a"], np.ones(2))
  np.testing.assert_array_equal(merged["b"], np.zeros((2, 2)))


def test_diff_and_compare():
  other = {"params": {"blocks": {"mlp": {"kernel": np.ones((2, 3), np.float16)}}, "head": {"kernel": np.eye(2)}}}
  d = trees.diff(TREE, other)
  assert d == ["missing params/blocks/mlp/bias (float64[3])",
               "dtype of params/blocks/mlp/kernel: expected float64, got float16"]
  assert trees.max_abs_diff(TREE, TREE)["params/head/kernel"] == 0.0


def test_one_mismatch_format_everywhere():
  lines = [f"missing l{i}" for i in range(8)]
  msg = trees.mismatch_message("x does not match y", lines, "retrain")
  assert msg == ("x does not match y: missing l0; missing l1; missing l2; missing l3; missing l4 (and 3 more); "
                 "retrain")
  assert trees.mismatch_message("w", lines[:trees.MISMATCH_SHOWN]) == "w: " + "; ".join(lines[:5])
  assert trees.shape_difference("a/k", np.zeros((2, 3)), np.zeros(4), ("model", "checkpoint")) == (
      "shape of a/k: model [2, 3], checkpoint [4]")
  assert trees.shape_difference("h", (7, 24), [5, 24]) == "shape of h: expected [7, 24], got [5, 24]"  # shapes
  # merge and check_same_structure raise the same format, capped at the same length
  inited = {f"k{i}": np.zeros(2) for i in range(7)}
  with pytest.raises(trees.TreeMismatchError) as e:
    trees.merge({k: np.zeros(3) for k in inited}, inited)
  assert str(e.value) == ("cannot merge trees: " + "; ".join(f"shape of k{i}: model [2], checkpoint [3]"
                                                             for i in range(5)) + " (and 2 more)")
  with pytest.raises(trees.TreeMismatchError) as e:
    trees.check_same_structure(inited, {}, "tree")
  assert str(e.value) == ("tree does not match: " + "; ".join(f"missing k{i} (float64[2])" for i in range(5))
                          + " (and 2 more)")
