"""TLEG / SWS: parameterizations, expansion transforms, gradients, bad inputs, and a pipeline smoke run."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ROOT

from jaxlab import build, checkpoint, transforms, trees
from jaxlab.parameterizations import learngene as lg
from jaxlab.transforms import learngene as tlg

MODEL = dict(name="vit", patch_size=4, width=16, depth=4, num_heads=2, mlp_dim=32, pool="gap",
             final_norm="tokens", drop_path=0.0, ln_eps=1e-5)
DATA = {"name": "digits", "num_classes": 10, "input_shape": [8, 8, 1], "input_dtype": "float32"}
SINGLE = {"patch_embed", "pos_embed", "norm", "head"}


@jax.jit
def _randomize(theta, seed):
  """Random values everywhere (so every tensor, bias and LN parameter matters in the checks)."""
  leaves, treedef = jax.tree.flatten(theta)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
  return jax.tree.unflatten(treedef, new)


def _loaded(pcfg: dict, model=MODEL, seed=0) -> checkpoint.Loaded:
  module = build.model(model, DATA["num_classes"])
  param = build.parameterization(pcfg, model)
  params = build.init_variables(module, jax.random.key(seed), (8, 8, 1))["params"]
  theta = _randomize(param.init(jax.random.key(seed + 1), params), seed + 2)
  meta = {"model": dict(model), "parameterization": dict(pcfg), "data": DATA}
  return checkpoint.Loaded(path=f"<in-memory {pcfg['name']}>", step=0, meta=meta, theta=theta, model_state={},
                           module=module, parameterization=param)


@pytest.fixture(scope="module")
def tleg():
  return _loaded({"name": "linear_learngene", "coefficient": "l/L"})


@pytest.fixture(scope="module")
def sws():
  return _loaded({"name": "stage_sharing", "stages": (1, 2, 1)})


@pytest.fixture(scope="module")
def x():
  return jax.random.uniform(jax.random.key(7), (5, 8, 8, 1))


def _apply(out, x):
  module = build.model(out.meta["model"], DATA["num_classes"])
  return jax.jit(module.apply)({"params": out.theta}, x)


# ----------------------------------------------------------------------------- formulas


def test_coefficients_follow_the_official_code():
  np.testing.assert_allclose(lg.coefficients(4), [0.0, 0.25, 0.5, 0.75])
  np.testing.assert_allclose(lg.coefficients(4, "l/(L-1)"), [0.0, 1 / 3, 2 / 3, 1.0], rtol=1e-6)
  np.testing.assert_allclose(lg.coefficients(1), [0.0])
  np.testing.assert_allclose(lg.coefficients(1, "l/(L-1)"), [0.0])


def test_tleg_init_and_which_tensors_are_expanded():
  model = dict(MODEL, init_scheme="deit")  # the std-0.02 scheme, so every kernel has one known std
  module = build.model(model, 10)
  params = build.init_variables(module, jax.random.key(0), (8, 8, 1))["params"]
  param = build.parameterization({"name": "linear_learngene"}, model)
  theta = param.init(jax.random.key(1), params)
  assert set(theta) == SINGLE | {"learngene"}
  a, b = trees.flatten(theta["learngene"]["A"]), trees.flatten(theta["learngene"]["B"])
  block_names = set(trees.flatten(params["blocks"]))
  assert set(a) == set(b) == block_names  # all 12 block tensors (qkv, proj, fc1, fc2, norm1, norm2; w and b)
  assert len(block_names) == 12
  for name in block_names:
    assert a[name].shape == trees.flatten(params["blocks"])[name].shape[1:]
    if name.endswith("kernel"):
      # truncated normal std 0.02 (flax truncates at 2 std: std of the truncated law is 0.02 * 0.8796)
      assert abs(float(jnp.std(a[name])) - 0.0176) < 0.0025 and abs(float(jnp.std(b[name])) - 0.0176) < 0.0025
    elif name.endswith("scale"):
      assert float(jnp.min(a[name])) == float(jnp.max(a[name])) == 1.0 and float(jnp.abs(b[name]).max()) == 0.0
    else:
      assert float(jnp.abs(a[name]).max()) == 0.0 and float(jnp.abs(b[name]).max()) == 0.0
  # the single copies are the ordinary init, unchanged
  for k in SINGLE:
    assert trees.allclose(theta[k], params[k])


# ----------------------------------------------------------------------------- TLEG expansion


def test_expansion_to_aux_depth_reproduces_the_aux_net(tleg, x):
  out = transforms.apply("expand_learngene", [tleg], {"depth": 4, "final_norm": "tokens", "ln_eps": 0})
  assert out.meta["parameterization"] == {"name": "identity"}
  np.testing.assert_allclose(_apply(out, x), tleg.apply(x), atol=2e-5)


def test_expansion_with_pooled_final_norm_is_ln_after_pooling(tleg, x):
  """The documented difference: the descendant applies the aux's final LN after pooling (timm fc_norm)."""
  out = transforms.apply("expand_learngene", [tleg], {"depth": 4, "final_norm": "pooled", "ln_eps": 0})
  y = _apply(out, x)
  _, inter = tleg.module.apply(tleg.variables(), x, mutable=["intermediates"])
  h = inter["intermediates"]["blocks"]["features"][0][-1].mean(axis=1)  # last block output, pooled
  p = tleg.params
  mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
  h = (h - mu) / jnp.sqrt(var + 1e-5) * p["norm"]["scale"] + p["norm"]["bias"]
  np.testing.assert_allclose(y, h @ p["head"]["kernel"] + p["head"]["bias"], atol=2e-5)
  assert float(jnp.max(jnp.abs(y - tleg.apply(x)))) > 1e-3  # ...which is not the aux net's function
  default = transforms.apply("expand_learngene", [tleg], {"depth": 4})
  assert default.meta["model"]["ln_eps"] == 1e-6 and default.meta["model"]["final_norm"] == "pooled"


def test_layer_zero_is_A_and_divisor_depths_are_strided_aux_layers():
  big = _loaded({"name": "linear_learngene"}, dict(MODEL, depth=12))
  aux = trees.flatten(big.params["blocks"])
  a = trees.flatten(big.theta["learngene"]["A"])
  for depth in (1, 2, 3, 4, 5, 6, 12):
    blocks = trees.flatten(tlg.expand_learngene_params(big.theta, depth)["blocks"])
    for name in a:
      np.testing.assert_array_equal(blocks[name][0], a[name])
      assert blocks[name].shape[0] == depth
  for depth, stride in ((6, 2), (4, 3), (3, 4), (2, 6), (1, 12)):
    blocks = trees.flatten(tlg.expand_learngene_params(big.theta, depth)["blocks"])
    for name in a:
      np.testing.assert_allclose(blocks[name], aux[name][::stride], atol=1e-6)


def test_gradients_wrt_A_B_are_the_layer_sums(tleg, x):
  labels = jnp.arange(x.shape[0]) % 10
  module, param = tleg.module, tleg.parameterization

  def loss_params(params):
    logits = module.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  g_theta = jax.jit(jax.grad(lambda t: loss_params(param.materialize(t))))(tleg.theta)
  g_layers = jax.jit(jax.grad(loss_params))(param.materialize(tleg.theta))  # per-layer gradients [L, ...]
  c = jnp.asarray(lg.coefficients(4))
  per_layer = trees.flatten(g_layers["blocks"])
  for name, ga in trees.flatten(g_theta["learngene"]["A"]).items():
    gl = per_layer[name]
    np.testing.assert_allclose(ga, gl.sum(0), rtol=1e-4, atol=1e-7)
    gb = trees.flatten(g_theta["learngene"]["B"])[name]
    np.testing.assert_allclose(gb, jnp.tensordot(c, gl, axes=1), rtol=1e-4, atol=1e-7)
  for k in SINGLE:
    assert trees.allclose(g_theta[k], g_layers[k], atol=1e-7)


def test_head_reinit_and_coefficient_variant(tleg, x):
  out = transforms.apply("expand_learngene", [tleg], {"depth": 3, "head": "reinit", "seed": 3})
  assert out.theta["head"]["kernel"].shape == tleg.theta["head"]["kernel"].shape
  assert float(jnp.abs(out.theta["head"]["bias"]).max()) == 0.0
  assert float(jnp.abs(out.theta["head"]["kernel"] - tleg.theta["head"]["kernel"]).max()) > 0.05
  assert trees.allclose(out.theta["norm"], tleg.theta["norm"])
  alt = transforms.apply("expand_learngene", [tleg], {"depth": 3, "coefficient": "l/(L-1)"})
  gene = tleg.theta["learngene"]
  last = alt.theta["blocks"]["attn"]["qkv"]["kernel"][-1]
  np.testing.assert_allclose(last, gene["A"]["attn"]["qkv"]["kernel"] + gene["B"]["attn"]["qkv"]["kernel"],
                             atol=1e-6)
  assert alt.report["coefficients"] == [0.0, 0.5, 1.0]


# ----------------------------------------------------------------------------- SWS


def test_split_rules():
  assert tlg.split_depth(12, (3, 3, 4, 3, 3), "even") == (3, 3, 2, 2, 2)  # the official 12-layer example
  assert tlg.split_depth(16, (3, 3, 4, 3, 3), "proportional") == (3, 3, 4, 3, 3)
  for depth in range(5, 17):
    for rule in tlg.SPLIT_RULES:
      split = tlg.split_depth(depth, (3, 3, 4, 3, 3), rule)
      assert sum(split) == depth and min(split) >= 1 and len(split) == 5


def test_sws_materialize_and_expansion(sws, x):
  stages = trees.flatten(sws.theta["stages"])
  assert all(v.shape[0] == 3 for v in stages.values())
  out = transforms.apply("expand_stages", [sws], {"layers_per_stage": (1, 2, 1), "final_norm": "tokens",
                                                   "ln_eps": 0})
  np.testing.assert_allclose(_apply(out, x), sws.apply(x), atol=2e-5)
  for depth in (3, 5, 7):
    for rule in tlg.SPLIT_RULES:
      out = transforms.apply("expand_stages", [sws], {"depth": depth, "rule": rule})
      src = out.report["layer_to_stage"]
      assert len(src) == depth and set(src) == {0, 1, 2} and src == sorted(src)  # every stage, in order
      blocks = trees.flatten(out.theta["blocks"])
      for name, stage_leaf in stages.items():
        for i, s in enumerate(src):  # copies of one stage are identical right after expansion
          np.testing.assert_array_equal(blocks[name][i], stage_leaf[s])


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs(tleg, sws):
  with pytest.raises(ValueError, match="depth must be >= 1"):
    transforms.apply("expand_learngene", [tleg], {"depth": 0})
  with pytest.raises(ValueError, match="coefficient"):
    transforms.apply("expand_learngene", [tleg], {"depth": 2, "coefficient": "l^2"})
  with pytest.raises(ValueError, match="below the 3 stages"):
    transforms.apply("expand_stages", [sws], {"depth": 2})
  with pytest.raises(ValueError, match="covers 4 layers, not depth 5"):
    transforms.apply("expand_stages", [sws], {"depth": 5, "layers_per_stage": (1, 2, 1)})
  with pytest.raises(ValueError, match="has 2 entries but the learngene has 3 stages"):
    transforms.apply("expand_stages", [sws], {"layers_per_stage": (2, 2)})
  with pytest.raises(ValueError, match="at least one layer"):
    transforms.apply("expand_stages", [sws], {"layers_per_stage": (2, 0, 2)})
  with pytest.raises(ValueError, match="sum to the depth"):
    build.parameterization({"name": "stage_sharing", "stages": (2, 2, 2)}, MODEL)
  plain = _loaded({"name": "identity"})
  with pytest.raises(tlg.NotALearngeneError, match="not a linear_learngene checkpoint"):
    transforms.apply("expand_learngene", [plain], {"depth": 2})
  with pytest.raises(tlg.NotALearngeneError, match="not a stage_sharing checkpoint"):
    transforms.apply("expand_stages", [tleg], {"depth": 4})
  with pytest.raises(ValueError, match="head"):
    transforms.apply("expand_learngene", [tleg], {"depth": 2, "head": "keep"})


# ----------------------------------------------------------------------------- pipeline smoke


def _config(arg):
  import importlib.util
  spec = importlib.util.spec_from_file_location("learngene_cfg", os.path.join(ROOT, "ml_collections_configs",
                                                                              "learngene.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_config_argument_picks_methods_and_smoke():
  assert _config(None).learngene.methods == ("tleg", "sws")
  assert _config("methods=sws").learngene.methods == ("sws",)
  smoke = _config("methods=tleg,smoke")
  assert smoke.learngene.methods == ("tleg",) and smoke.learngene.depths == (2,)
  with pytest.raises(ValueError, match="unknown config argument 'big'"):
    _config("big")


def test_pipeline_smoke(tmp_path):
  from jaxlab import main
  out = main.run(_config("smoke"), str(tmp_path))  # learngene.py:smoke, both methods
  with open(os.path.join(tmp_path, "results.json")) as f:
    res = json.load(f)
  rows = res["rows"]
  for r in rows:
    assert {"name", "method", "depth", "seed", "test_acc", "train_steps", "params"} <= set(r)
    assert 0.0 <= r["test_acc"] <= 1.0
  methods = {r["method"] for r in rows}
  assert {"teacher", "plain_teacher", "plain_aux", "tleg_aux", "sws_aux", "tleg", "sws", "scratch",
          "scratch_2x"} <= methods
  # the expansion to the aux depth with the aux's own final norm is the aux net: identical test accuracy
  same = [p for p in res["preconditions"] if "is the aux net" in p["name"]]
  assert len(same) == 2 and all(p["holds"] and p["value"] == 0.0 for p in same)
  assert len(res["claims"]) == 4
  if any(not p["holds"] for p in res["preconditions"] if p["name"].startswith("teacher")):  # every claim rests on it
    assert all(c["verdict"] == "not tested" and c["evidence"].startswith("precondition failed") for c in res["claims"])
  # a descendant and its scratch twin have the same architecture
  d = {(r["method"], r["depth"]): r["params"] for r in rows}
  assert d[("tleg", 2)] == d[("scratch", 2)] == d[("sws", 2)]
  st = out["summary"]["methods"]["tleg"]["stored"]
  assert st["sum_descendant_params"] == sum(d[("tleg", k)] for k in out["summary"]["methods"]["tleg"]["depths"])
  # a depth-2 descendant holds exactly two blocks + the single copies: as many as (A, B) + single copies
  assert st["learngene_params"] + st["shared_params"] == st["learngene_plus_shared"] == d[("tleg", 2)]
  assert st["ratio"] == 1.0
  for name in ("results.md", "accuracy_vs_depth.png"):
    assert os.path.getsize(os.path.join(tmp_path, name)) > 0
