"""MNIST-1D data, the baseline model zoo and the `mnist1d` pipeline config."""

import builtins
import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import data, models, trees
from jaxlab.data import mnist1d
from jaxlab.models import zoo
from jaxlab.pipelines import mnist1d as pipe

m1d = pytest.importorskip("mnist1d.data")


@pytest.fixture(scope="module")
def package_arrays():
  """The package's own arrays, generated here from its defaults."""
  return m1d.make_dataset(m1d.get_dataset_args())


@pytest.fixture(scope="module")
def ds():
  return data.get_dataset(mnist1d.data_config())


# ----------------------------------------------------------------------------- data


def test_equal_to_package_arrays_and_splits_partition_train(ds, package_arrays):
  idx = mnist1d.split_indices(4000, mnist1d.DEFAULT_VALIDATION_SIZE, mnist1d.DEFAULT_HELDOUT_SIZE)
  for split in ("train", "validation", "heldout"):
    src = ds.split(split)
    np.testing.assert_array_equal(src.arrays["inputs"][..., 0], package_arrays["x"][idx[split]].astype(np.float32))
    np.testing.assert_array_equal(src.arrays["label"], package_arrays["y"][idx[split]])
  test = ds.split("test").arrays
  np.testing.assert_array_equal(test["inputs"][..., 0], package_arrays["x_test"].astype(np.float32))
  np.testing.assert_array_equal(test["label"], package_arrays["y_test"])
  # the three index sets are disjoint and cover the package's 4000 training signals exactly once
  allidx = np.concatenate([idx["train"], idx["validation"], idx["heldout"]])
  assert len(allidx) == len(set(allidx.tolist())) == 4000


def test_shapes_labels_and_info(ds):
  assert ds.num_classes == 10 and ds.input_shape == (40, 1)
  assert {k: ds.num_examples(k) for k in ds.splits} == {"train": 3200, "validation": 400, "heldout": 400,
                                                         "test": 1000}
  for split in ds.splits:
    a = ds.split(split).arrays
    assert a["inputs"].dtype == np.float32 and a["inputs"].shape[1:] == (40, 1)
    assert a["label"].dtype == np.int32 and a["label"].min() == 0 and a["label"].max() == 9
  assert ds.info["vocab_size"] == 0 and ds.info["input_channels"] == 1 and ds.info["seq_len"] == 40
  assert ds.info["generator_args"]["seed"] == 42 and ds.info["generator_args"]["num_samples"] == 5000
  # the package normalises the whole set to mean 0 and std 1
  x = np.concatenate([ds.split(s).arrays["inputs"] for s in ds.splits]).astype(np.float64)
  assert abs(x.mean()) < 1e-5 and x.std() == pytest.approx(1.0, abs=1e-5)


def test_no_split_overlaps_as_signals(ds):
  seen = {}
  for split in ds.splits:
    for row in ds.split(split).arrays["inputs"]:
      key = row.tobytes()
      assert key not in seen, f"a signal of {split!r} is also in {seen.get(key)!r}"
      seen[key] = split


def test_generation_is_deterministic_and_restores_global_rng():
  args = mnist1d.generator_args({"num_samples": 200})
  np.random.seed(7)
  random.seed(7)
  before_np, before_py = np.random.random(), random.random()
  np.random.seed(7)
  random.seed(7)
  a = mnist1d.generate(args)
  b = mnist1d.generate(args)
  assert np.random.random() == before_np and random.random() == before_py
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  c = mnist1d.generate({**args, "seed": 43})
  assert not np.array_equal(a["x"], c["x"])


def test_knobs_cache_and_sizes(tmp_path, monkeypatch):
  cfg = mnist1d.data_config(num_samples=300, final_seq_length=20, iid_noise_scale=0.05, validation_size=20,
                            heldout_size=10, train_size=100, cache_dir=str(tmp_path))
  d = data.get_dataset(cfg)
  assert d.input_shape == (20, 1) and d.info["seq_len"] == 20
  assert {k: d.num_examples(k) for k in d.splits} == {"validation": 20, "heldout": 10, "train": 100, "test": 60}
  files = os.listdir(tmp_path)
  assert len(files) == 1 and files[0].endswith(".npz")
  # the second build reads the cache and never calls the generator
  monkeypatch.setattr(mnist1d, "generate", lambda args: (_ for _ in ()).throw(AssertionError("regenerated")))
  d2 = data.get_dataset(cfg)
  np.testing.assert_array_equal(d2.split("train").arrays["inputs"], d.split("train").arrays["inputs"])
  # a size of 0 drops the split
  d3 = data.get_dataset(mnist1d.data_config(num_samples=300, final_seq_length=20, iid_noise_scale=0.05,
                                            validation_size=0, heldout_size=0, cache_dir=str(tmp_path)))
  assert sorted(d3.splits) == ["test", "train"] and d3.num_examples() == 240


def test_jaxlab_cache_env(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXLAB_CACHE", str(tmp_path))
  assert mnist1d.cache_dir(mnist1d.data_config()) == os.path.join(str(tmp_path), "mnist1d")
  assert mnist1d.cache_dir(mnist1d.data_config(cache_dir=str(tmp_path / "x"))) == str(tmp_path / "x")


def test_signal_augment_is_a_circular_shift():
  aug = mnist1d.signal_augment(shift=3)
  x = np.random.default_rng(0).standard_normal((8, 40, 1)).astype(np.float32)
  out = aug({"inputs": x, "label": np.zeros(8)}, np.random.default_rng(1))["inputs"]
  for a, b in zip(x, out):
    shifts = [s for s in range(-3, 4) if np.array_equal(np.roll(a, s, axis=0), b)]
    assert shifts, "each row must be a circular shift of its input by at most 3 steps"
  assert mnist1d.signal_augment() is None


@pytest.mark.parametrize("over, match", [
    ({"validation_size": 2000, "heldout_size": 2000}, "leave no training signals"),
    ({"train_size": 5000}, "train_size=5000 exceeds"),
    ({"train_split": 1.5}, r"train_split=1.5 must be in \(0, 1\)"),
    ({"num_samples": 5}, "num_samples=5 must be at least 10"),
])
def test_bad_inputs(over, match):
  with pytest.raises(ValueError, match=match):
    data.get_dataset(mnist1d.data_config(**over))


def test_missing_package_names_the_extra(monkeypatch):
  real_import = builtins.__import__

  def fake_import(name, *args, **kwargs):
    if name == "mnist1d" or name.startswith("mnist1d."):
      raise ModuleNotFoundError(f"No module named {name!r}")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", fake_import)
  with pytest.raises(ImportError, match=r"pip install -e '\.\[mnist1d\]'") as e:
    data.get_dataset(mnist1d.data_config())
  assert isinstance(e.value, ValueError)  # so `jaxlab.main` prints it as a one-line error
  assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- zoo


def _expected_params(name: str) -> int:
  t, k = 40, 10
  if name == "logreg":
    return t * k + k
  if name == "mlp":
    h = 100
    return (t * h + h) + (h * h + h) + (h * k + k)
  if name == "cnn1d":
    c = 25
    length = t
    for ks in (5, 3, 3):
      length = (length + 2 - ks) // 2 + 1  # stride 2, padding 1
    assert length == 5
    return (5 * 1 * c + c) + 2 * (3 * c * c + c) + (length * c * k + k)
  if name == "gru":
    h = 6
    per_direction = 3 * h * 1 + 3 * h * h + 4 * h  # Flax GRUCell: 3 input kernels + biases, 3 recurrent, 1 bias
    return 2 * per_direction + (t * 2 * h * k + k)
  raise KeyError(name)


@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn1d", "gru"])
def test_zoo_param_counts_and_layouts(name):
  m = models.build({"name": name}, 10)
  x = jax.random.normal(jax.random.key(0), (3, 40, 1))
  v = m.init(jax.random.key(1), x)
  assert trees.count(v["params"]) == _expected_params(name)
  y3 = m.apply(v, x)
  assert y3.shape == (3, 10) and y3.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(m.apply(v, x[..., 0])), np.asarray(y3), rtol=1e-6, atol=1e-6)


def test_torch_style_init_bounds():
  v = models.build({"name": "mlp"}, 10).init(jax.random.key(0), jnp.zeros((1, 40, 1)))
  k = np.asarray(v["params"]["fc2"]["kernel"])
  bound = 1 / np.sqrt(100)
  assert np.abs(k).max() <= bound and np.abs(k).max() > 0.95 * bound
  assert k.std() == pytest.approx(bound / np.sqrt(3), rel=0.05)


def test_zoo_mlp_residual_identity():
  """With fc2 zeroed the residual layer is the identity: the MLP equals head(relu(fc1(x)))."""
  m = models.build({"name": "mlp"}, 10)
  x = jax.random.normal(jax.random.key(0), (4, 40))
  p = m.init(jax.random.key(1), x)["params"]
  p = {**p, "fc2": jax.tree.map(jnp.zeros_like, p["fc2"])}
  h = jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
  np.testing.assert_allclose(np.asarray(m.apply({"params": p}, x)),
                             np.asarray(h @ p["head"]["kernel"] + p["head"]["bias"]), rtol=1e-5, atol=1e-5)


def test_zoo_bad_keys():
  with pytest.raises(ValueError, match=r"unknown keys \['width'\] for model 'mlp'"):
    models.build({"name": "mlp", "width": 3}, 10)
  with pytest.raises(ValueError, match="init_scheme must be 'torch' or 'flax'"):
    m = models.build({"name": "logreg", "init_scheme": "xavier"}, 10)
    m.init(jax.random.key(0), jnp.zeros((1, 40)))


def test_vit_reads_1d_signals():
  m = models.build(zoo.vit1d_config(), 10)
  v = m.init(jax.random.key(0), jnp.zeros((2, 40, 1)))
  assert v["params"]["patch_embed"]["kernel"].shape == (4, 1, 32)
  assert v["params"]["pos_embed"].shape == (1, 10, 32)  # 40 / 4 tokens


# ----------------------------------------------------------------------------- pipeline


def _claims(table, workdir, majority=0.1):
  import ml_collections

  from jaxlab.experiments import Experiment, Report
  rep = Report(Experiment(ml_collections.ConfigDict({"mnist1d": {"x": 1}}), workdir, "mnist1d"), "t")
  pipe.claims(rep, table, majority)
  return rep


def test_claims_compare_with_the_paper_within_two_binomial_errors(tmp_path):
  g = lambda m, mean: {"model": m, "mean": mean, "std": 0.01, "n": 3}  # noqa: E731
  # mlp: 0.70 vs 0.68 is within 2 * sqrt(.68 * .32 / 1000) = 2.95 points; cnn 0.90 vs 0.94 is outside 1.5 points
  rep = _claims([g("logreg", 0.31), g("mlp", 0.70), g("gru", 0.92), g("cnn1d", 0.90), g("vit", 0.5)], str(tmp_path))
  verdicts = {c["claim"].split(" ")[0]: c["verdict"] for c in rep.claims}
  assert verdicts == {"`logreg`": "holds", "`mlp`": "holds", "`gru`": "holds", "`cnn1d`": "does not hold",
                      "logistic": "does not hold"}  # gru 92 > cnn 90 breaks the ordering
  assert "+2.0 points; two binomial standard errors 3.0" in rep.claims[1]["evidence"]
  # a model at the majority class learned nothing: its claims are not tested
  rep = _claims([g("logreg", 0.11), g("mlp", 0.70)], str(tmp_path), majority=0.1)
  assert [c["verdict"] for c in rep.claims] == ["not tested", "holds", "not tested"]


def _config(arg=None):
  """`get_config(arg)` of ml_collections_configs/mnist1d.py."""
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "ml_collections_configs", "mnist1d.py")
  spec = importlib.util.spec_from_file_location("mnist1d_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  from jaxlab import main
  wd = str(tmp_path_factory.mktemp("mnist1d_smoke"))
  out = main.run(_config("smoke"), wd)
  return wd, out


def test_smoke_trains_every_zoo_model_through_the_loop(smoke):
  wd, out = smoke
  res = json.load(open(os.path.join(wd, "results.json")))
  assert [r["model"] for r in res["rows"]] == ["logreg", "mlp", "cnn1d", "gru", "vit"]
  for r in res["rows"]:
    assert {"name", "model", "params", "seed", "test_acc"} <= set(r)
    assert 0.0 <= r["test_acc"] <= 1.0 and r["steps"] == 2
    if r["model"] != "vit":
      assert r["params"] == _expected_params(r["model"])
    summary = json.load(open(os.path.join(wd, r["name"], "summary.json")))
    assert summary["metrics"]["test"]["count"] == 1000 and summary["metrics"]["train"]["count"] == 4000
  md = open(os.path.join(wd, "results.md")).read()
  assert "| paper |" in md and "94%" in md
  assert os.path.getsize(os.path.join(wd, "mnist1d.png")) > 1000
  from jaxlab import checkpoint
  meta = checkpoint.load(os.path.join(wd, "cnn1d_s0")).meta
  assert meta["data"]["name"] == "mnist1d" and meta["data"]["seq_len"] == 40


def test_smoke_rerun_skips_done_stages(smoke, monkeypatch):
  wd, out = smoke
  from jaxlab import train
  monkeypatch.setattr(train, "train_and_evaluate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
  again = pipe.run(_config("smoke"), wd)
  assert [r["test_acc"] for r in again["rows"]] == [r["test_acc"] for r in out["rows"]]


def test_unknown_zoo_model_is_refused(tmp_path):
  c = _config("smoke")
  c.mnist1d.models = ("resnet",)
  with pytest.raises(ValueError, match="'resnet' has no config.mnist1d.model_configs entry"):
    pipe.run(c, str(tmp_path))
  c = _config("smoke")
  c.mnist1d.run_overrides.vit.optimizer.lrr = 1.0
  with pytest.raises(ValueError, match="config.mnist1d.run_overrides.vit: stage override 'optimizer.lrr'"):
    pipe.run(c, str(tmp_path))
  assert not os.path.exists(tmp_path / "logreg_s0")  # refused before anything trained
