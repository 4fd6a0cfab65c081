"""Model soups: uniform (streaming), greedy, learned, interpolation, logit ensemble, sharding, pipeline smoke."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import weakref

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from conftest import TEST_XLA_FLAGS

from jaxlab import build, checkpoint, configs, data, models, parameterizations, train, transforms, trees
from jaxlab.transforms import engine, soups

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config() -> ml_collections.ConfigDict:
  c = configs.base()
  c.model = ml_collections.ConfigDict(dict(name="vit", patch_size=4, width=16, depth=2, num_heads=2, mlp_dim=32))
  c.progress = False
  return c


def save_ckpt(workdir, params, config, dataset, init_from="/pretrained"):
  """Writes `params` as a jaxlab checkpoint fine-tuned from `init_from`."""
  meta = train.make_meta(config, dataset, 0, {}, {"init_from": init_from, "step": 1})
  checkpoint.save_weights(str(workdir), 0, jax.device_get(params), meta)
  return str(workdir)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A pre-trained init and 4 'fine-tunes' of it (init + noise), plus a duplicate of ingredient 0."""
  root = tmp_path_factory.mktemp("soups")
  config = tiny_config()
  dataset = data.get_dataset(config.data)
  module = build.model(config.model, dataset.num_classes)
  p0 = build.init_variables(module, jax.random.key(0), dataset.input_shape)["params"]
  ingredients = []
  for i in range(4):
    rng = np.random.default_rng(i)
    ingredients.append(jax.tree.map(lambda x, r=rng: np.asarray(x) + 0.05 * r.standard_normal(x.shape).astype(
        np.float32), p0))
  paths = [save_ckpt(root / f"ft{i}", p, config, dataset) for i, p in enumerate(ingredients)]
  dup = save_ckpt(root / "ft0_copy", ingredients[0], config, dataset)
  return dict(root=root, config=config, dataset=dataset, module=module, params=ingredients, paths=paths, dup=dup)


def test_soup_of_one_is_that_checkpoint(world):
  out = transforms.apply("uniform_soup", world["paths"][:1])
  for k, v in trees.flatten(world["params"][0]).items():
    np.testing.assert_array_equal(np.asarray(trees.flatten(out.theta)[k]), v)


def test_uniform_soup_is_the_numpy_mean_and_streams(world):
  live, peak = [0], [0]

  class Counting(engine.Inputs):
    def __getitem__(self, i):
      ld = super().__getitem__(i)
      live[0] += 1
      peak[0] = max(peak[0], live[0])
      weakref.finalize(ld, lambda: live.__setitem__(0, live[0] - 1))
      return ld

  inputs = Counting(world["paths"])
  out = transforms.apply("uniform_soup", inputs)
  expected = {k: np.mean([trees.flatten(p)[k] for p in world["params"]], axis=0)
              for k in trees.flatten(world["params"][0])}
  got = trees.flatten(out.theta)
  assert got.keys() == expected.keys()
  for k in expected:
    np.testing.assert_allclose(np.asarray(got[k]), expected[k], rtol=1e-6, atol=1e-7)
    assert got[k].dtype == np.float32
  assert inputs.num_loads == 4 and peak[0] == 1  # one ingredient in memory at a time
  assert out.report["num_ingredients"] == 4


def test_weighted_soup_and_interpolation(world):
  a, b = world["params"][:2]
  out = transforms.apply("uniform_soup", world["paths"][:2], {"weights": "1,3"})
  for k, v in trees.flatten(out.theta).items():
    np.testing.assert_allclose(np.asarray(v), 0.25 * trees.flatten(a)[k] + 0.75 * trees.flatten(b)[k], atol=1e-6)
  for alpha in (0.0, 1.0, 0.3):
    out = transforms.apply("interpolate", world["paths"][:2], {"alpha": alpha})
    for k, v in trees.flatten(out.theta).items():
      want = (1 - alpha) * trees.flatten(a)[k] + alpha * trees.flatten(b)[k]
      np.testing.assert_allclose(np.asarray(v), want, atol=1e-6)
  with pytest.raises(ValueError, match="got 3 weights for 2"):
    transforms.apply("uniform_soup", world["paths"][:2], {"weights": (1, 2, 3)})


def test_greedy_strict_rejects_an_exact_duplicate_and_geq_accepts_it(world):
  pair = [world["paths"][0], world["dup"]]
  strict = transforms.apply("greedy_soup", pair, {"accept": ">"})
  loose = transforms.apply("greedy_soup", pair, {"accept": ">="})
  assert strict.report["num_ingredients"] == 1
  assert loose.report["num_ingredients"] == 2
  assert strict.report["soup_acc"] == loose.report["soup_acc"] == strict.report["ingredient_acc"][pair[0]]
  # averaging a model with itself is the model
  assert trees.allclose(loose.theta, world["params"][0], atol=0, rtol=0)


def test_greedy_never_worse_than_best_ingredient_on_heldout(world):
  out = transforms.apply("greedy_soup", world["paths"], {"split": "heldout"})
  r = out.report
  assert r["soup_acc"] >= r["best_ingredient_acc"]
  accs = r["ingredient_acc"]
  assert accs[r["chosen"][0]] == max(accs.values())  # starts from a best ingredient (ties: the official order)
  ev = soups.Evaluator(world["module"], world["dataset"], "heldout")
  assert ev(out.theta, {}) == pytest.approx(r["soup_acc"])
  # the accepted candidates are exactly the running means of the chosen ingredients
  chosen = [world["params"][world["paths"].index(p)] for p in r["chosen"]]
  assert trees.allclose(out.theta, soups.mean_trees(chosen), atol=1e-6)


def test_learned_soup_at_init_is_the_uniform_soup(world):
  uniform = transforms.apply("uniform_soup", world["paths"]).theta
  for granularity in ("tensor", "model"):
    param = parameterizations.build({"name": "soup_mixture", "ingredients": tuple(world["paths"]),
                                     "granularity": granularity})
    theta = param.init(jax.random.key(0), world["params"][0])
    assert trees.allclose(param.materialize(theta), uniform, atol=1e-6)
  shapes = {k: v.shape for k, v in trees.flatten(theta).items()}
  assert shapes == {"mix_logits": (4,), "logit_scale": ()}
  param = parameterizations.build({"name": "soup_mixture", "ingredients": tuple(world["paths"])})
  theta = param.init(jax.random.key(0), world["params"][0])
  assert trees.flatten(theta)["mix_logits/blocks/attn/qkv/kernel"].shape == (2, 4)  # one mixture per layer
  # the logit scale multiplies the logits exactly; one-hot logits pick one ingredient
  x = world["dataset"].sample_batch(4)["inputs"]
  base = world["module"].apply({"params": param.materialize(theta)}, x)
  theta2 = dict(theta, logit_scale=2.0 * theta["logit_scale"])
  np.testing.assert_allclose(world["module"].apply({"params": param.materialize(theta2)}, x), 2 * base,
                             rtol=1e-5, atol=1e-5)
  pick = dict(theta, mix_logits=jax.tree.map(lambda m: m.at[..., 2].set(60.0), theta["mix_logits"]))
  assert trees.allclose(param.materialize(pick), world["params"][2], atol=1e-5)
  with pytest.raises(ValueError, match="ingredients"):
    parameterizations.build({"name": "soup_mixture", "ingredients": ()})


def test_logit_ensemble_of_one_model_is_the_model(world):
  ens = soups.logit_ensemble(world["paths"][:1], splits=("test",))
  single = train.evaluate_checkpoint(world["paths"][0], "test")
  assert ens["test"]["accuracy"] == pytest.approx(single["accuracy"])
  assert ens["test"]["count"] == 360


def test_init_from_with_a_soup_transform(world, tmp_path):
  c = tiny_config()
  c.total_steps = 1
  c.optimizer.lr = 0.0
  c.optimizer.weight_decay = 0.0
  c.model.drop_path = 0.0
  c.eval_splits = ()
  c.final_eval_splits = ()
  c.init_from.path = world["paths"][0]
  c.init_from.transform = "uniform_soup"
  c.init_from.args = ml_collections.ConfigDict({"more_inputs": ",".join(world["paths"][1:3])})
  train.train_and_evaluate(c, str(tmp_path / "run"))
  theta = checkpoint.load(str(tmp_path / "run")).theta
  assert trees.allclose(theta, soups.mean_trees(world["params"][:3]), atol=1e-6)


class _BNNet(nn.Module):
  """Pixels -> BatchNorm -> Dense: its batch statistics are numpy-checkable."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.99, name="bn")(x)
    return nn.Dense(self.num_classes, name="head")(x)


models.register("_test_bn")(lambda cfg, num_classes: _BNNet(num_classes))


def test_batch_stats_averaged_or_recomputed(world, tmp_path):
  c = tiny_config()
  c.model = ml_collections.ConfigDict({"name": "_test_bn"})
  ds = world["dataset"]
  v = build.init_variables(_BNNet(10), jax.random.key(0), ds.input_shape)
  paths, stats = [], []
  for i in range(2):
    st = jax.tree.map(lambda x, i=i: ((1.0 + i) * (np.arange(x.size) % 5 + 1)).astype(np.float32).reshape(x.shape),
                      v["batch_stats"])
    stats.append(st)
    meta = train.make_meta(c, ds, 0, {}, {"init_from": "/pretrained", "step": 1})
    checkpoint.save_weights(str(tmp_path / f"bn{i}"), 0, v["params"], meta, {"batch_stats": st})
    paths.append(str(tmp_path / f"bn{i}"))
  avg = transforms.apply("uniform_soup", paths)
  assert trees.allclose(avg.model_state["batch_stats"], jax.tree.map(lambda a, b: (a + b) / 2, *stats), atol=1e-6)
  assert avg.report["batch_stats"] == "averaged"
  rec = transforms.apply("uniform_soup", paths, {"recompute_batch_stats": 3, "batch_size": 64})
  xs = [ds.train_batch(step, 64, 0)["inputs"].reshape(64, -1).astype(np.float64) for step in range(3)]
  got = rec.model_state["batch_stats"]["bn"]
  np.testing.assert_allclose(got["mean"], np.mean([x.mean(0) for x in xs], 0), rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(got["var"], np.mean([x.var(0) for x in xs], 0), rtol=1e-3, atol=1e-4)


SHARDED = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 " + os.environ.get("XLA_FLAGS", "")
    import jax, ml_collections, numpy as np
    from jaxlab.transforms import engine
    from jaxlab import checkpoint, trees
    assert len(jax.devices()) == 8
    inputs, out = sys.argv[1].split(","), sys.argv[2]
    c = ml_collections.ConfigDict(dict(transform="uniform_soup", inputs=tuple(inputs), args={},
        sharding=dict(num_devices=8, fsdp=((".*kernel", -1), (".*pos_embed", 1)))))
    res = engine.run(c, out)
    ld = checkpoint.load(out)
    print(json.dumps({"n_dev": 8, "workdir": res["workdir"]}))
""")


def test_sharded_and_unsharded_soups_agree(world, tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env["XLA_FLAGS"] = TEST_XLA_FLAGS  # the snippet adds its 8 devices to the suite's compile flags
  proc = subprocess.run([sys.executable, "-c", SHARDED, ",".join(world["paths"]), str(tmp_path / "sharded")],
                        capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1])["n_dev"] == 8
  sharded = checkpoint.load(str(tmp_path / "sharded")).theta
  engine.run(ml_collections.ConfigDict(dict(transform="uniform_soup", inputs=tuple(world["paths"]), args={})),
             str(tmp_path / "single"))
  single = checkpoint.load(str(tmp_path / "single")).theta
  diffs = trees.max_abs_diff(sharded, single)
  assert max(diffs.values()) <= 1e-6, diffs


def test_soups_pipeline_smoke(tmp_path):
  import importlib.util

  from jaxlab import main
  spec = importlib.util.spec_from_file_location("soups_cfg", os.path.join(REPO, "ml_collections_configs/soups.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  result = main.run(mod.get_config("smoke"), str(tmp_path / "soups"))
  rows = {r["name"]: r for r in json.load(open(tmp_path / "soups" / "results.json"))["rows"]}
  for name in ("uniform_soup", "greedy_soup", "learned_soup", "logit_ensemble"):
    assert name in rows, sorted(rows)
    for key in ("heldout_acc", "test_acc", "shift_acc", "params"):
      assert rows[name][key] is not None
  best_heldout = max(r["heldout_acc"] for r in rows.values() if r["kind"] == "ingredient")
  assert rows["greedy_soup"]["heldout_acc"] >= best_heldout
  assert os.path.exists(tmp_path / "soups" / "results.md") and os.path.exists(tmp_path / "soups" / "soups.png")
  assert result["rows"] == len(rows)
