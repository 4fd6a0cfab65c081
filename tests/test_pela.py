"""PELA: low-rank ViT, `lowrank_svd`, the weight perturbation term and the pipeline smoke run."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import build, checkpoint, objectives, transforms, trees
from jaxlab.losses import pela as pela_loss
from jaxlab.models import lowrank_vit
from jaxlab.transforms import lowrank

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(name="vit", patch_size=4, width=16, depth=2, num_heads=2, mlp_dim=32, pool="gap")
INPUT = (8, 8, 1)


def _pela_config(arg=None):
  spec = importlib.util.spec_from_file_location("pela_config", os.path.join(ROOT, "ml_collections_configs", "pela.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _init(model_cfg, seed=0):
  module = build.model(model_cfg, 10)
  return module, build.init_variables(module, jax.random.key(seed), INPUT)["params"]


@pytest.fixture(scope="module")
def dense():
  module, params = _init(TINY)
  x = jax.random.normal(jax.random.key(1), (4, *INPUT))
  return module, params, x


def _compress(params, **lr_cfg):
  cfg = {**TINY, "name": "lowrank_vit", **lr_cfg}
  module = build.model(cfg, 10)
  target = build.abstract_params(cfg, 10, INPUT)
  out, err, dropped = lowrank.compress_params(params, target)
  return module, out, err, dropped


# ----------------------------------------------------------------------------- factorization


def test_full_rank_reproduces_dense_layers_and_outputs(dense):
  module, params, x = dense
  lr_module, lr_params, err, dropped = _compress(params, ratio=0.25)  # rule gives > min(d_in, d_out): capped
  for layer, (d_in, d_out) in {"blocks/attn/qkv": (16, 48), "blocks/attn/proj": (16, 16),
                               "blocks/mlp/fc1": (16, 32), "blocks/mlp/fc2": (32, 16)}.items():
    u = trees.flatten(lr_params)[f"{layer}/u"]
    assert u.shape == (2, d_in, min(d_in, d_out))
    assert err[layer] < 1e-5 and dropped[layer] < 1e-5
  # biases and everything not factorized are copied exactly
  fl, fd = trees.flatten(lr_params), trees.flatten(params)
  for name in fl:
    if not name.endswith(("/u", "/v")):
      np.testing.assert_array_equal(np.asarray(fl[name]), np.asarray(fd[name]))
  y_dense = module.apply({"params": params}, x, train=False)
  y_low = lr_module.apply({"params": lr_params}, x, train=False)
  np.testing.assert_allclose(np.asarray(y_low), np.asarray(y_dense), atol=1e-5, rtol=1e-5)


def test_truncation_error_is_norm_of_dropped_singular_values():
  k = jax.random.normal(jax.random.key(3), (3, 12, 20))
  u, v, dropped = lowrank.svd_factors(k, rank=5)
  assert u.shape == (3, 12, 5) and v.shape == (3, 5, 20)
  s = np.linalg.svd(np.asarray(k, np.float64), compute_uv=False)
  for d in range(3):
    err = np.linalg.norm(np.asarray(k[d]) - np.asarray(u[d] @ v[d]))
    np.testing.assert_allclose(err, np.sqrt(np.sum(s[d, 5:] ** 2)), rtol=1e-4)
    np.testing.assert_allclose(float(dropped[d]), np.sqrt(np.sum(s[d, 5:] ** 2)), rtol=1e-4)
    # sqrt(S) split evenly: u^T u = v v^T = diag(S_r)
    np.testing.assert_allclose(np.asarray(u[d].T @ u[d]), np.diag(s[d, :5]), atol=1e-4)
    np.testing.assert_allclose(np.asarray(v[d] @ v[d].T), np.diag(s[d, :5]), atol=1e-4)


def test_keep_dense_layer_is_copied(dense):
  _, params, _ = dense
  _, lr_params, err, _ = _compress(params, ratio=2.0, keep_dense=["head", "blocks/attn/proj"])
  flat = trees.flatten(lr_params)
  assert "blocks/attn/proj/kernel" in flat and "blocks/attn/proj/u" not in flat
  np.testing.assert_array_equal(np.asarray(flat["blocks/attn/proj/kernel"]),
                                np.asarray(trees.flatten(params)["blocks/attn/proj/kernel"]))
  assert set(err) == {"blocks/attn/qkv", "blocks/mlp/fc1", "blocks/mlp/fc2"}


# ----------------------------------------------------------------------------- rank rule and counts


def test_deit_b_ranks_and_param_count_without_allocating():
  cfg = dict(name="lowrank_vit", size="B", patch_size=16, pool="cls", ratio=2.0)
  assert lowrank_vit.layer_ranks(cfg) == {"blocks/attn/qkv": 288, "blocks/attn/proj": 192,
                                          "blocks/mlp/fc1": 307, "blocks/mlp/fc2": 307}
  abstract = build.abstract_params(cfg, 1000, (224, 224, 3))  # jax.eval_shape: no weights
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
  n_low = build.count_params(cfg, 1000, (224, 224, 3))
  n_dense = build.count_params({**cfg, "name": "vit", "ratio": None}, 1000, (224, 224, 3))
  assert n_dense == 86_567_656
  assert n_low == 44_081_896  # about 44.1 M
  assert trees.flatten(abstract)["blocks/mlp/fc1/u"].shape == (12, 768, 307)


@pytest.mark.parametrize("d_in,d_out,ratio", [(768, 2304, 2.0), (768, 3072, 1.5), (64, 128, 3.0)])
def test_rank_rule_keeps_about_one_over_ratio(d_in, d_out, ratio):
  r = lowrank_vit.rank_for(d_in, d_out, ratio)
  assert r == int(np.floor(d_in * d_out / (ratio * (d_in + d_out))))
  kept = lowrank.expected_kept_fraction(d_in, d_out, ratio)
  assert kept <= 1 / ratio and kept > 1 / ratio - (d_in + d_out) / (d_in * d_out)


def test_rank_rule_bad_inputs():
  with pytest.raises(ValueError, match="ratio must be > 0"):
    lowrank_vit.rank_for(16, 16, 0.0)
  with pytest.raises(ValueError, match="rank 0"):
    lowrank_vit.rank_for(2, 2, 5.0)
  with pytest.raises(ValueError, match="ratio must be > 0"):
    build.model({**TINY, "name": "lowrank_vit", "ratio": -1.0}, 10)
  assert lowrank_vit.rank_for(16, 48, 2.0, rank=100) == 16
  with pytest.raises(ValueError, match="keep_dense"):
    build.model({**TINY, "name": "lowrank_vit", "keep_dense": ["("]}, 10)


# ----------------------------------------------------------------------------- weight perturbation


def test_weight_perturbation_zero_at_exact_factors_and_value(dense):
  _, params, _ = dense
  _, exact, _, _ = _compress(params, ratio=0.25)
  assert float(pela_loss.weight_perturbation_penalty(exact, params, eps=0.0)) < 1e-10
  _, low, _, _ = _compress(params, ratio=2.0)
  s, t = trees.flatten(low), trees.flatten(params)
  eps = 1e-3
  expected = []
  for layer in ("blocks/attn/qkv", "blocks/attn/proj", "blocks/mlp/fc1", "blocks/mlp/fc2"):
    w = np.einsum("lir,lro->lio", np.asarray(s[f"{layer}/u"]), np.asarray(s[f"{layer}/v"]))
    dev = np.abs(w - np.asarray(t[f"{layer}/kernel"])).max(axis=(1, 2))
    expected += list((dev - eps) ** 2)
  got = float(pela_loss.weight_perturbation_penalty(low, params, eps=eps))
  np.testing.assert_allclose(got, np.mean(expected), rtol=1e-5)


def test_weight_perturbation_gradient_reaches_only_student_factors(dense):
  _, params, _ = dense
  _, low, _, _ = _compress(params, ratio=2.0)
  g_student, g_teacher = jax.grad(pela_loss.weight_perturbation_penalty, argnums=(0, 1))(low, params, 0.0)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_teacher))
  for name, g in trees.flatten(g_student).items():
    if name.endswith(("/u", "/v")):
      assert float(jnp.abs(g).max()) > 0.0, name
    else:
      assert float(jnp.abs(g).max()) == 0.0, name


def test_weight_perturbation_bad_inputs(dense):
  _, params, _ = dense
  with pytest.raises(ValueError, match="no factorized layers"):
    pela_loss.weight_perturbation_penalty(params, params)
  _, low, _, _ = _compress(params, ratio=2.0)
  with pytest.raises(ValueError, match="objective.teacher"):
    pela_loss.weight_perturbation_penalty(low, None)
  ctx = objectives.Context(logits=None, batch={}, params=low, teacher_params=params)
  cfg = {"weights": {"weight_perturbation": 1.0}, "wp_eps": 0.0}
  loss, metrics = objectives.total_loss(ctx, cfg)
  assert "loss/weight_perturbation" in metrics and float(loss) > 0


def test_feature_mse_accepts_intermediates_tree():
  a = {"blocks": {"features": (jnp.ones((2, 3, 4, 5)),)}}
  b = {"blocks": {"features": (jnp.zeros((2, 3, 4, 5)),)}}
  ctx = objectives.Context(logits=None, batch={}, features=a, teacher_features=b)
  assert float(objectives.feature_mse(ctx, {})) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="differ"):
    objectives.feature_mse(objectives.Context(logits=None, batch={}, features=a,
                                              teacher_features={"x": jnp.zeros((1,))}), {})


# ----------------------------------------------------------------------------- pipeline smoke + checkpoints


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  from jaxlab import main
  wd = str(tmp_path_factory.mktemp("pela_smoke"))
  cfg = _pela_config("smoke")
  main.run(cfg, wd)
  return wd


def test_smoke_pipeline_writes_results(smoke):
  with open(os.path.join(smoke, "results.json")) as f:
    res = json.load(f)
  names = [r["name"] for r in res["rows"]]
  assert names[:3] == ["dense", "dense_ft", "svd"]
  assert {"svd_ft", "pela_fd", "pela_fd_wp", "wp100"} <= set(names)
  for r in res["rows"]:
    assert {"name", "ratio", "params", "test_acc", "seed"} <= set(r)
    assert 0.0 <= r["test_acc"] <= 1.0
  rows = {r["name"]: r for r in res["rows"]}
  assert rows["pela_fd"]["diff_vs_fd"] == 0 and rows["wp100"]["wp_weight"] == 100.0
  low = [r for r in res["rows"] if not r["name"].startswith("dense")]
  assert all(r["params"] < rows["dense"]["params"] for r in low)
  assert len({r["params"] for r in low}) == 1  # same architecture for every low-rank row
  assert rows["dense_ft"]["params"] == rows["dense"]["params"]
  assert os.path.exists(os.path.join(smoke, "results.md")) and os.path.exists(os.path.join(smoke, "pela.png"))
  # preconditions before the claims; every claim has a verdict
  assert [q["name"][:13] for q in res["preconditions"]][:2] == ["dense teacher"] * 2
  assert {c["verdict"] for c in res["claims"]} <= {"holds", "does not hold", "not tested"} and len(res["claims"]) == 3
  # loss-term gradient ratios at the SVD init: cross entropy is the reference (ratio 1, cosine 1)
  ce = res["term_ratios"]["SVD init"]["cross_entropy"]
  assert ce["ratio"] == pytest.approx(1.0) and ce["cosine"] == pytest.approx(1.0, abs=1e-5)
  assert set(res["term_ratios"]["after training"]) == {"cross_entropy", "feature_mse", "weight_perturbation"}
  # the PELA stage really trained with the three terms
  rows = [json.loads(line) for line in open(os.path.join(smoke, "seed0", "r2", "pela_fd_wp", "metrics.jsonl"))]
  keys = set().union(*rows)
  assert {"train/loss/cross_entropy", "train/loss/feature_mse", "train/loss/weight_perturbation"} <= keys


def test_pela_teacher_is_trained_with_the_default_jobs_recipe():
  spec = importlib.util.spec_from_file_location("digits_vit", os.path.join(ROOT, "ml_collections_configs",
                                                                           "digits_vit.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  default, pela = mod.get_config(), _pela_config()
  for key in ("model", "data", "optimizer", "total_epochs", "total_steps", "seed"):
    assert pela[key] == default[key], key
  # pela declares objective.wp_eps for its student stages (unused by the teacher's cross entropy)
  assert {k: v for k, v in pela.objective.to_dict().items() if k != "wp_eps"} == default.objective.to_dict()


def test_forward_flops_formula():
  # TINY: 8x8 input, 4x4 patches -> 4 tokens, width 16, MLP 32, depth 2, 10 classes
  module, params = _init(TINY)
  per_token = 4 * 4 * 1 * 16 + 2 * (16 * 48 + 16 * 16 + 16 * 32 + 32 * 16)
  expected = 2 * (4 * per_token + 2 * 2 * 4 * 4 * 16 + 16 * 10)
  assert lowrank_vit.forward_flops(params) == expected
  _, low, _, _ = _compress(params, ratio=2.0)
  r = {k: lowrank_vit.rank_for(a, b, 2.0) for k, (a, b) in {"qkv": (16, 48), "proj": (16, 16), "fc1": (16, 32),
                                                            "fc2": (32, 16)}.items()}
  per_token_low = 4 * 4 * 16 + 2 * (r["qkv"] * 64 + r["proj"] * 32 + r["fc1"] * 48 + r["fc2"] * 48)
  assert lowrank_vit.forward_flops(low) == 2 * (4 * per_token_low + 2 * 2 * 4 * 4 * 16 + 160)


def test_interleaved_throughput_orders_median_between_min_and_max(smoke):
  from jaxlab.experiments.measure import interleaved_throughput
  got = interleaved_throughput({"dense": checkpoint.load(os.path.join(smoke, "seed0", "dense")),
                                "svd": checkpoint.load(os.path.join(smoke, "seed0", "r2", "svd"))}, batch=8, rounds=3)
  assert set(got) == {"dense", "svd"}
  for v in got.values():
    assert 0 < v["min"] <= v["median"] <= v["max"]


def test_transform_on_checkpoint_full_rank_matches_dense_outputs(smoke):
  dense_ckpt = checkpoint.load(os.path.join(smoke, "seed0", "dense"))
  out = transforms.apply("lowrank_svd", [dense_ckpt], {"ratio": 0.1})
  assert out.meta["model"]["name"] == "lowrank_vit"
  assert out.report["params_after"] > out.report["params_before"]  # full rank costs more than dense
  module = build.model(out.meta["model"], 10)
  x = jax.random.uniform(jax.random.key(0), (3, *INPUT))
  np.testing.assert_allclose(np.asarray(module.apply({"params": out.theta}, x)),
                             np.asarray(dense_ckpt.apply(x)), atol=1e-5, rtol=1e-5)
  svd = checkpoint.load(os.path.join(smoke, "seed0", "r2", "svd"))
  assert svd.meta["provenance"]["transform"] == "lowrank_svd"
  assert svd.meta["provenance"]["report"]["params_after"] < svd.meta["provenance"]["report"]["params_before"]


def test_transform_bad_inputs(smoke):
  svd = checkpoint.load(os.path.join(smoke, "seed0", "r2", "svd"))
  with pytest.raises(ValueError, match="only dense 'vit'"):
    transforms.apply("lowrank_svd", [svd], {"ratio": 2.0})
  dense_ckpt = checkpoint.load(os.path.join(smoke, "seed0", "dense"))
  with pytest.raises(ValueError, match="ratio must be > 0"):
    transforms.apply("lowrank_svd", [dense_ckpt], {"ratio": -2.0})
  with pytest.raises(ValueError, match="unknown argument"):
    transforms.apply("lowrank_svd", [dense_ckpt], {"rato": 2.0})


def test_pipeline_bad_config(tmp_path):
  from jaxlab import pipelines
  cfg = _pela_config("smoke")
  cfg.pela.variants = ("pela_magic",)
  with pytest.raises(ValueError, match="variants within"):
    pipelines.get("pela")(cfg, str(tmp_path))
  with pytest.raises(ValueError, match="unknown config argument"):
    _pela_config("big")
