"""MixtureGrowth: WRN, template mixing, grow_mixture (+ baselines), and the pipeline smoke run."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import build, checkpoint, parameterizations, transforms, trees
from jaxlab.models import wrn
from jaxlab.parameterizations import template_mixing as tm
from jaxlab.pipelines import mixture_growth as mgp

FULL = {"name": "wrn", "depth": 10, "widen_factor": 0.5, "stem_width": 8, "mid_bn": False, "head_bias": True}
HALF = mgp.member_model(FULL)
SHAPE = (8, 8, 1)
K = 10


def _perturb(tree, key, scale=0.3):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [x + scale * jax.random.uniform(k, x.shape) for x, k in zip(leaves, keys)])


def _member(member: int, coef_seed: int = 3) -> checkpoint.Loaded:
  """An in-memory 'checkpoint' of a template member with non-trivial BN parameters and statistics."""
  module = build.model(HALF, K)
  variables = build.init_variables(module, jax.random.key(10 + member), SHAPE)
  params = variables.pop("params")
  pcfg = {"name": "template_mixing", "num_templates": 2, "member": member, "coef_seed": coef_seed}
  param = build.parameterization(pcfg, HALF)
  theta = param.init(jax.random.key(7), params)
  # Non-trivial BN affine parameters, running statistics and head bias.
  theta = trees.map_with_names(lambda n, x: x if "kernel" in n else x + 0.2 * (member + 1) * jnp.sin(
      jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape) + member), theta)
  state = _perturb(variables, jax.random.key(20 + member))
  meta = {"model": dict(HALF), "parameterization": pcfg, "data": {"num_classes": K, "input_shape": list(SHAPE)}}
  return checkpoint.Loaded(path=f"member{member}", step=1, meta=meta, theta=theta, model_state=state,
                           module=module, parameterization=param)


def _logits(loaded_like, theta, state, model_cfg, pcfg, x):
  module = build.model(model_cfg, K)
  params = build.parameterization(pcfg, model_cfg).materialize(theta)
  return module.apply({"params": params, **state}, x, train=False)


@pytest.fixture(scope="module")
def members():
  return _member(0), _member(1)


@pytest.fixture(scope="module")
def x():
  return jax.random.uniform(jax.random.key(5), (6, *SHAPE))


@pytest.fixture(scope="module")
def member_logits(members, x):
  return [ld.apply(x) for ld in members]


@pytest.fixture(scope="module")
def grown_zero(members):
  return transforms.apply("grow_mixture", list(members), {"coefficients": "zero"})


# ----------------------------------------------------------------------------
# Model and FLOPs
# ----------------------------------------------------------------------------


def test_wrn_shapes_and_analytic_macs():
  module = build.model(FULL, K)
  variables = build.init_variables(module, jax.random.key(0), SHAPE)
  flat = trees.flatten(variables["params"])
  assert flat["stem/kernel"].shape == (3, 3, 1, 8)
  assert flat["stage3_block0/conv2/kernel"].shape == (3, 3, 32, 32)
  assert flat["stage2_block0/shortcut/kernel"].shape == (1, 1, 8, 16)
  assert "bn1" in variables["batch_stats"]["stage1_block0"]
  # MACs from the param tree: every kernel's size times its output positions (8x8, 8x8, 4x4, 2x2).
  hw = {"stem": 64, "stage1": 64, "stage2": 16, "stage3": 4}
  expect = sum(int(np.prod(v.shape)) * hw[k.split("_")[0].split("/")[0]]
               for k, v in flat.items() if k.endswith("kernel") and v.ndim == 4)
  expect += int(np.prod(flat["head/kernel"].shape))
  assert wrn.forward_macs(FULL, K, SHAPE) == expect
  # The member is exactly a quarter of the inner convs (half width in and out).
  assert wrn.forward_macs(HALF, K, SHAPE) < wrn.forward_macs(FULL, K, SHAPE) / 3.5


def test_wrn_bad_config():
  with pytest.raises(ValueError, match="depth"):
    build.init_variables(build.model(dict(FULL, depth=11), K), jax.random.key(0), SHAPE)
  with pytest.raises(ValueError, match="unknown WRN key"):
    build.model(dict(FULL, width=3), K)
  with pytest.raises(ValueError, match="stem_width"):
    mgp.member_model(dict(FULL, stem_width=7))


# ----------------------------------------------------------------------------
# Template mixing
# ----------------------------------------------------------------------------


def test_one_hot_coefficients_reproduce_a_template(members):
  ld = members[0]
  name = "stage2_block0/conv1/kernel"
  for t in range(2):
    theta = trees.map_with_names(lambda n, v, t=t: jax.nn.one_hot(t, 2) if n == f"{name}/coefs" else v, ld.theta)
    params = ld.parameterization.materialize(theta)
    np.testing.assert_array_equal(trees.flatten(params)[name], trees.flatten(ld.theta)[f"{name}/templates"][t])


def test_init_kaiming_on_stacked_tensor_and_orthogonal_coefs():
  module = build.model(dict(FULL, widen_factor=1.0, stem_width=16), K)
  params = build.init_variables(module, jax.random.key(0), SHAPE)["params"]
  param = parameterizations.build({"name": "template_mixing", "num_templates": 2, "member": -1}, {})
  theta = param.init(jax.random.key(1), params)
  node = theta["stage3_block0"]["conv2"]["kernel"]
  block = (3, 3, 32, 32)  # full 64 channels, halved
  assert node["templates"].shape == (2, 2, *block)
  # torch kaiming_normal_ on [n, Co/2, Ci/2, k, k]: fan_in = Co/2 * Ci/2 * k * k.
  np.testing.assert_allclose(float(jnp.std(node["templates"])), np.sqrt(2.0 / np.prod(block)), rtol=0.02)
  c = np.asarray(node["coefs"])
  assert c.shape == (4, 2)
  np.testing.assert_allclose(c.T @ c, np.eye(2), atol=1e-5)  # orthonormal columns (torch orthogonal_ on 4x2)
  assert theta["head"]["kernel"]["coefs"].shape == (2, 2)
  assert theta["stem"]["kernel"]["templates"].shape == (2, 2, 3, 3, 1, 8)


def test_members_draw_rows_of_one_orthogonal_matrix(members):
  m0, m1 = members
  name = "stage1_block0/conv2/kernel"
  mat = tm.coefficient_matrix(3, name, 4, 2)
  np.testing.assert_allclose(trees.flatten(m0.theta)[f"{name}/coefs"], mat[0], atol=0)
  np.testing.assert_allclose(trees.flatten(m1.theta)[f"{name}/coefs"], mat[1], atol=0)
  # The two members' templates differ (independent sets).
  assert not np.allclose(trees.flatten(m0.theta)[f"{name}/templates"], trees.flatten(m1.theta)[f"{name}/templates"])


def test_bad_parameterization_config():
  with pytest.raises(ValueError, match="member"):
    parameterizations.build({"name": "template_mixing", "member": 2}, {})
  with pytest.raises(ValueError, match="num_templates"):
    parameterizations.build({"name": "template_mixing", "num_templates": 0}, {})


# ----------------------------------------------------------------------------
# Growth
# ----------------------------------------------------------------------------


def test_zero_growth_is_the_sum_of_member_logits(grown_zero, member_logits, x):
  out = grown_zero
  logits = _logits(None, out.theta, out.model_state, out.meta["model"], out.meta["parameterization"], x)
  np.testing.assert_allclose(logits, member_logits[0] + member_logits[1], rtol=1e-4, atol=1e-4)
  assert out.meta["model"]["stem_width"] == 2 * HALF["stem_width"]
  assert out.meta["model"]["widen_factor"] == FULL["widen_factor"]


def test_grown_param_count_equals_dense_plus_coefficients(grown_zero):
  dense = build.init_variables(build.model(grown_zero.meta["model"], K), jax.random.key(0), SHAPE)["params"]
  coefs = sum(v.size for v in tm.coefficients(grown_zero.theta).values())
  n_inner = sum(1 for k in tm.coefficients(grown_zero.theta) if tm.layer_kind(k) == "inner")
  assert coefs == 2 * (4 * n_inner + 2 + 2)  # 4 vectors per inner conv, 2 for stem and classifier, n = 2
  # Inner convs: 2 sets x 2 templates of a quarter block = the dense kernel. Stem and classifier are tiled in only
  # 2 blocks, so their 2 x 2 templates hold twice the dense kernel (as in the official code).
  flat = trees.flatten(dense)
  extra = flat["stem/kernel"].size + flat["head/kernel"].size
  assert trees.count(grown_zero.theta) == trees.count(dense) + coefs + extra
  params = build.parameterization(grown_zero.meta["parameterization"], {}).materialize(grown_zero.theta)
  trees.check_same_structure(dense, params)


def test_batchnorm_concatenation_keeps_each_member_in_its_half(grown_zero, members):
  for coll, src in (("theta", "theta"), ("model_state", "model_state")):
    grown = trees.flatten(getattr(grown_zero, coll))
    for name, v0 in trees.flatten(getattr(members[0], src)).items():
      if "kernel" in name or name == "head/bias":
        continue
      v1 = trees.flatten(getattr(members[1], src))[name]
      c = v0.shape[-1]
      np.testing.assert_array_equal(grown[name][..., :c], v0)
      np.testing.assert_array_equal(grown[name][..., c:], v1)
  biases = [trees.flatten(m.theta)["head/bias"] for m in members]
  np.testing.assert_allclose(trees.flatten(grown_zero.theta)["head/bias"], biases[0] + biases[1])


def test_orthogonal_and_copy_rules(members):
  name = "stage2_block0/conv2/kernel"
  orth = tm.coefficients(transforms.apply("grow_mixture", list(members), {}).theta)[name]
  c0, c1 = trees.flatten(members[0].theta)[f"{name}/coefs"], trees.flatten(members[1].theta)[f"{name}/coefs"]
  np.testing.assert_allclose(orth[:2], np.stack([c0, c1]))
  np.testing.assert_allclose(orth[2], tm.coefficient_matrix(3, name, 4, 2)[2], atol=1e-6)  # c_2 keeps its init
  a = np.stack([orth[0], orth[1], orth[2]])
  np.testing.assert_allclose(np.linalg.norm(orth[3]), 1.0, atol=1e-5)  # noise 1.0 x unit singular vector
  np.testing.assert_allclose(np.linalg.norm(a @ orth[3]), np.linalg.svd(a, compute_uv=False)[-1], atol=1e-5)
  cp = tm.coefficients(transforms.apply("grow_mixture", list(members), {"coefficients": "copy",
                                                                       "noise": 0.5}).theta)[name]
  np.testing.assert_allclose(cp[2] - cp[0], cp[3] - cp[1], atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(cp[2] - cp[0]), 0.5, atol=1e-5)
  rnd = tm.coefficients(transforms.apply("grow_mixture", list(members), {"coefficients": "random"}).theta)[name]
  assert np.all((rnd[2:] >= 0) & (rnd[2:] <= 1))
  # The grown kernel's diagonal blocks are the members' kernels whatever the rule.
  k = trees.flatten(build.parameterization(
      {"name": "template_mixing", "member": -1}, {}).materialize(
          transforms.apply("grow_mixture", list(members), {}).theta))[name]
  p0 = trees.flatten(members[0].params)[name]
  c = p0.shape[-1]
  np.testing.assert_allclose(k[..., :c, :c], p0, atol=1e-6)


def test_net2net_preserves_function_and_random_growth_keeps_diagonal(members, member_logits, x):
  out = transforms.apply("grow_net2net", [members[0]], {"noise": 0.0})
  logits = _logits(None, out.theta, out.model_state, out.meta["model"], {"name": "identity"}, x)
  np.testing.assert_allclose(logits, member_logits[0], rtol=1e-4, atol=1e-4)
  rnd = transforms.apply("grow_random", list(members), {"seed": 1})
  k, p1 = trees.flatten(rnd.theta)["stage3_block0/conv1/kernel"], trees.flatten(members[1].params)[
      "stage3_block0/conv1/kernel"]
  ci, co = p1.shape[-2:]
  np.testing.assert_allclose(k[..., ci:, co:], p1, atol=1e-6)
  assert float(jnp.abs(k[..., :ci, co:]).max()) > 0  # random off-diagonal block


def test_bad_inputs(members, grown_zero):
  dense = checkpoint.Loaded(path="dense", step=1, meta={"model": dict(HALF), "parameterization": {"name": "identity"}},
                            theta=members[0].params, model_state=members[0].model_state, module=None,
                            parameterization=parameterizations.build({}, {}))
  with pytest.raises(ValueError, match="not a template network"):
    transforms.apply("grow_mixture", [dense, members[1]])
  grown = checkpoint.Loaded(path="grown", step=1, meta={"model": grown_zero.meta["model"],
                                                        "parameterization": grown_zero.meta["parameterization"]},
                            theta=grown_zero.theta, model_state=grown_zero.model_state, module=None,
                            parameterization=None)
  with pytest.raises(ValueError, match="already grown"):
    transforms.apply("grow_mixture", [grown, members[1]])
  with pytest.raises(ValueError, match="already grown"):
    transforms.apply("grow_net2net", [grown])
  with pytest.raises(ValueError, match="member 1; give member 0 first"):
    transforms.apply("grow_mixture", [members[1], members[0]])
  with pytest.raises(ValueError, match="not in"):
    transforms.apply("grow_mixture", list(members), {"coefficients": "ones"})
  with pytest.raises(ValueError, match="takes (2|exactly two) input"):
    transforms.apply("grow_mixture", [members[0]])


# ----------------------------------------------------------------------------
# Pipeline smoke run through the real entry point's library function
# ----------------------------------------------------------------------------


def test_pipeline_smoke(tmp_path):
  import importlib.util

  from jaxlab import main
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ml_collections_configs",
                      "mixture_growth.py")
  spec = importlib.util.spec_from_file_location("mixture_growth_config", path)
  cfg_mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cfg_mod)
  config = cfg_mod.get_config("smoke")  # ml_collections_configs/mixture_growth.py:smoke
  config.mixture_growth.rules = ("orthogonal", "zero")  # the smoke config runs one rule and one baseline
  config.mixture_growth.baselines = ("small", "net2net", "random_growth", "large")
  out = main.run(config, str(tmp_path))
  with open(out["results"]) as f:
    res = json.load(f)
  names = {r["name"] for r in res["rows"]}
  assert {"member0", "member1", "mg_orthogonal", "mg_zero", "ensemble", "small", "net2net", "random_growth",
          "large"} <= names
  for r in res["rows"]:
    assert set(mgp.ROW_KEYS) <= set(r)
    assert 0.0 <= r["test_acc"] <= 1.0
  rows = {r["name"]: r for r in res["rows"]}
  # Zero growth starts as the members' ensemble; grown runs count the members' FLOPs.
  assert rows["mg_zero"]["acc_at_growth"] == rows["ensemble"]["test_acc"]
  assert rows["mg_orthogonal"]["flops"] == pytest.approx(rows["member0"]["flops"] + rows["member1"]["flops"]
                                                         + mgp.train_flops(config.model.to_dict(), 4, 64, K,
                                                                           (40, 1)))  # MNIST-1D signals
  assert abs(rows["large"]["flops"] / rows["mg_orthogonal"]["flops"] - 1) < 0.1
  assert rows["mg_orthogonal"]["trainable"] > rows["mg_orthogonal"]["params"]  # templates + coefficients
  for f in ("results.md", "accuracy_vs_flops.png"):
    assert os.path.exists(tmp_path / f)
  # grown stages name their own learning rate and start from the grown checkpoint
  over = {s["name"]: s["request"] for s in res["stages"]}
  assert over["seed0/mg_orthogonal"]["overrides"]["optimizer.lr"] == config.mixture_growth.grow_lr
  assert over["seed0/mg_orthogonal"]["overrides"]["init_from.path"] == str(tmp_path / "seed0/grow_orthogonal_init")
  assert over["seed0/grow_orthogonal_init"]["transform"] == "grow_mixture"
  assert {c["claim"] for c in res["claims"]} == {"MixtureGrowth beats growth with random new blocks",
                                                "MixtureGrowth beats growth by copying (Net2Net)",
                                                "MixtureGrowth beats the large network from scratch at the same "
                                                "training FLOPs"}
  # every claim rests on the full-vs-half-width gap, checked first: its value is large minus small
  (pre,) = res["preconditions"]
  assert pre["value"] == pytest.approx(rows["large"]["test_acc"] - rows["small"]["test_acc"])
  assert pre["threshold"] == config.mixture_growth.min_gap
  assert all(c["verdict"] == "not tested" for c in res["claims"]) or pre["holds"]
  # Re-running skips every done stage and rewrites the same rows.
  again = main.run(config, str(tmp_path))
  with open(again["results"]) as f:
    res2 = json.load(f)
  assert [r["test_acc"] for r in res2["rows"]] == [r["test_acc"] for r in res["rows"]]
  assert all(s["skipped"] for s in res2["stages"])
