"""Merging transforms against independent numpy versions of each paper's formula, identities, sharding, smoke.

The fixture's task vectors are multiples of 1/8 in {-2..2}/8 on a base that is a multiple of 1/64, so
theta - base is exact in float32 and many entries tie in magnitude and in sign votes (the edge cases where
implementations differ).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
from conftest import TEST_XLA_FLAGS

from jaxlab import build, checkpoint, configs, data, train, transforms, trees
from jaxlab.transforms import engine, merging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_FT = 3


def tiny_config() -> ml_collections.ConfigDict:
  c = configs.base()
  c.model = ml_collections.ConfigDict(dict(name="vit", patch_size=4, width=16, depth=2, num_heads=2, mlp_dim=32))
  c.progress = False
  return c


def save(workdir, params, config, dataset, provenance):
  meta = train.make_meta(config, dataset, 0, {}, provenance)
  checkpoint.save_weights(str(workdir), 0, jax.device_get(params), meta)
  return str(workdir)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("merging")
  config = tiny_config()
  dataset = data.get_dataset(config.data)
  module = build.model(config.model, dataset.num_classes)
  p0 = build.init_variables(module, jax.random.key(0), dataset.input_shape)["params"]
  base = jax.tree.map(lambda x: (np.round(np.asarray(x) * 64) / 64).astype(np.float32), p0)
  base_path = save(root / "base", base, config, dataset, {})
  fts = []
  for i in range(N_FT):
    rng = np.random.default_rng(10 + i)
    fts.append(jax.tree.map(lambda x, r=rng: (x + r.integers(-2, 3, x.shape) / 8).astype(np.float32), base))
  paths = [save(root / f"ft{i}", p, config, dataset, {"init_from": base_path, "step": 0}) for i, p in enumerate(fts)]
  return dict(root=root, config=config, dataset=dataset, base=base, fts=fts, paths=paths, base_path=base_path)


def flat(tree) -> dict[str, np.ndarray]:
  return {k: np.asarray(v, np.float64) for k, v in trees.flatten(tree).items()}


def rows(x: np.ndarray, name: str) -> np.ndarray:
  """One row per tensor of the original model: per layer for leaves stacked on the depth axis."""
  return x.reshape(x.shape[0], -1) if name.startswith("blocks/") else x.reshape(1, -1)


def per_leaf(fn, base, fts):
  """Applies `fn(name, base_rows, [ft_rows])` to every leaf; returns `{name: array}` in the leaf's shape."""
  b, fs = flat(base), [flat(f) for f in fts]
  return {n: fn(n, rows(b[n], n), [rows(f[n], n) for f in fs]).reshape(b[n].shape) for n in b}


def assert_close(out, expected, atol=1e-5):
  got = flat(out.theta)
  assert set(got) == set(expected)
  for n in got:
    np.testing.assert_allclose(got[n], expected[n], atol=atol, rtol=1e-5, err_msg=n)


# ---------------------------------------------------------------------------- numpy references


def np_trim(tau: np.ndarray, density: float) -> np.ndarray:
  """TIES `topk_values_mask`: keep |tau| >= the k-th smallest magnitude, k = D - int(D * density)."""
  if density >= 1:
    return tau
  out = np.zeros_like(tau)
  for r in range(tau.shape[0]):
    a = np.abs(tau[r])
    k = a.size - int(a.size * density)
    kth = np.sort(a)[k - 1] if k > 0 else -np.inf
    out[r] = np.where(a >= kth, tau[r], 0.0)
  return out


def np_ties(taus: list[np.ndarray], weights=None) -> np.ndarray:
  """Sign election by summed mass (zero sum: the tensor's majority sign), disjoint (weighted) mean."""
  w = np.ones(len(taus)) if weights is None else np.asarray(weights, np.float64)
  wt = np.stack([wi * t for wi, t in zip(w, taus)])
  sign = np.sign(wt.sum(0))
  for r in range(sign.shape[0]):
    sign[r][sign[r] == 0] = np.sign(np.sign(wt.sum(0)[r]).sum())
  agree = np.where(sign > 0, wt > 0, wt < 0)
  num = (wt * agree).sum(0)
  den = (w[:, None, None] * agree).sum(0)
  return num / np.where(den == 0, 1, den)


def np_breadcrumbs_mask(tau: np.ndarray, density: float, gamma: float) -> np.ndarray:
  if density >= 1:
    return np.ones_like(tau, bool)
  mask = np.zeros_like(tau, bool)
  for r in range(tau.shape[0]):
    d = tau.shape[1]
    n_top, n_bot = int(gamma * d), d - int(density * d) - int(gamma * d)
    if n_bot < 0:
      n_top, n_bot = n_top + n_bot, 0
    order = np.argsort(np.abs(tau[r]), kind="stable")
    mask[r, order[n_bot : d - n_top]] = True
  return mask


def np_slerp(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
  out = np.empty_like(v0)
  for r in range(v0.shape[0]):
    a, b = v0[r], v1[r]
    ua = a / np.linalg.norm(a) if np.linalg.norm(a) > 1e-8 else a
    ub = b / np.linalg.norm(b) if np.linalg.norm(b) > 1e-8 else b
    dot = float(np.sum(ua * ub))
    if abs(dot) > 0.9995:
      out[r] = (1 - t) * a + t * b
    else:
      th = np.arccos(dot)
      out[r] = np.sin(th * (1 - t)) / np.sin(th) * a + np.sin(th * t) / np.sin(th) * b
  return out


def np_model_stock(base: np.ndarray, fts: list[np.ndarray]) -> np.ndarray:
  """Jang et al.: t = N cos / (1 + (N-1) cos), cos the mean pairwise cosine of task vectors, per tensor."""
  n = len(fts)
  out = np.empty_like(base)
  for r in range(base.shape[0]):
    taus = [f[r] - base[r] for f in fts]
    cos = [
      np.dot(taus[i], taus[j]) / (np.linalg.norm(taus[i]) * np.linalg.norm(taus[j]))
      for i in range(n)
      for j in range(i + 1, n)
    ]
    c = np.mean(cos)
    t = n * c / (1 + (n - 1) * c)
    out[r] = t * np.mean([f[r] for f in fts], 0) + (1 - t) * base[r]
  return out


# ---------------------------------------------------------------------------- formulas


def test_fixture_has_ties_in_magnitude_and_sign_votes(world):
  b, fs = flat(world["base"]), [flat(f) for f in world["fts"]]
  tau = {n: np.stack([f[n] - b[n] for f in fs]) for n in b}
  k = tau["blocks/mlp/fc1/kernel"]
  assert (k.sum(0) == 0).mean() > 0.1  # tied sign votes (sum of task vectors exactly 0)
  assert len(np.unique(np.abs(k))) <= 3  # magnitudes tie: {0, 1/8, 1/4}


def test_task_arithmetic_formula_with_per_input_weights(world):
  out = transforms.apply("task_arithmetic", world["paths"], {"scale": 0.7, "weights": "(1.0, 0.5, -0.25)"})
  w = [1.0, 0.5, -0.25]
  assert_close(
    out, per_leaf(lambda n, b, fs: b + 0.7 * sum(wi * (f - b) for wi, f in zip(w, fs)), world["base"], world["fts"])
  )
  assert out.report["passes_over_inputs"] == 1 and out.report["base"] == os.path.abspath(world["base_path"])


@pytest.mark.parametrize("density", [0.2, 0.55, 1.0])
def test_ties_matches_reference_formula(world, density):
  out = transforms.apply("ties_merge", world["paths"], {"density": density, "scale": 0.9})
  assert out.report["passes_over_inputs"] == 2
  assert_close(
    out,
    per_leaf(lambda n, b, fs: b + 0.9 * np_ties([np_trim(f - b, density) for f in fs]), world["base"], world["fts"]),
  )


def test_ties_weighted_disjoint_mean(world):
  w = (2.0, 1.0, 0.5)
  out = transforms.apply("ties_merge", world["paths"], {"density": 0.5, "weights": str(w)})
  assert_close(
    out, per_leaf(lambda n, b, fs: b + np_ties([np_trim(f - b, 0.5) for f in fs], w), world["base"], world["fts"])
  )


def test_per_tensor_rules_and_depth_gradients(world):
  """density by regex (first match wins), lambda as a (start, end) gradient across the 2 layers of blocks/."""
  dens = "[('blocks/attn/.*', 0.3), ('blocks/.*', 0.8), ('.*', 1.0)]"
  lam = "[('blocks/.*', (0.2, 1.0)), ('head/.*', 0.5)]"  # other leaves: the default 1.0
  out = transforms.apply("ties_merge", world["paths"], {"density": dens, "scale": lam})

  def expected(n, b, fs):
    d = 0.3 if n.startswith("blocks/attn/") else 0.8 if n.startswith("blocks/") else 1.0
    la = np.array([[0.2], [1.0]]) if n.startswith("blocks/") else 0.5 if n.startswith("head/") else 1.0
    return b + la * np_ties([np_trim(f - b, d) for f in fs])

  assert_close(out, per_leaf(expected, world["base"], world["fts"]))
  lay = merging.Layout.of(world["base"], merging.DEFAULT_LAYER_LEAVES)
  vals = dict(
    zip(lay.names, lay.values(merging.coefficient("[('blocks/.*', [0.0, 0.5, 1.0])]", "t", 0.0)), strict=True)
  )
  np.testing.assert_allclose(vals["blocks/mlp/fc1/kernel"], [0.0, 1.0])  # 3 anchors over 2 layers: ends
  with pytest.raises(ValueError, match=r"config.args.scale: per-layer values .* for head/bias"):
    transforms.apply("task_arithmetic", world["paths"], {"scale": "[0.1, 0.9]"})


def test_breadcrumbs_matches_mergekit_magnitude_outliers(world):
  out = transforms.apply("breadcrumbs", world["paths"], {"density": 0.6, "gamma": 0.1, "scale": 1.0})
  assert out.report["passes_over_inputs"] == 1
  assert_close(
    out,
    per_leaf(
      lambda n, b, fs: b + sum(np.where(np_breadcrumbs_mask(f - b, 0.6, 0.1), f - b, 0) for f in fs),
      world["base"],
      world["fts"],
    ),
  )


def test_dare_drops_and_rescales_deterministically(world):
  args = {"density": 0.3, "seed": 7}
  one = transforms.apply("dare", world["paths"][:1], args)
  again = transforms.apply("dare", world["paths"][:1], args)
  other = transforms.apply("dare", world["paths"][:1], {**args, "seed": 8})
  b, f = flat(world["base"]), flat(world["fts"][0])
  got, got2, got3 = flat(one.theta), flat(again.theta), flat(other.theta)
  kept = total = 0
  for n in b:
    tau, delta = f[n] - b[n], got[n] - b[n]
    keep = np.abs(delta) > 0
    np.testing.assert_allclose(delta[keep], tau[keep] / 0.3, rtol=1e-5, atol=1e-6, err_msg=n)
    np.testing.assert_array_equal(got[n], got2[n])
    mask = np.asarray(jax.random.bernoulli(merging.leaf_key(7, 0, n), 0.3, rows(b[n], n).shape)).reshape(b[n].shape)
    np.testing.assert_allclose(got[n], b[n] + np.where(mask, tau / 0.3, 0), atol=1e-5, err_msg=n)
    kept, total = kept + mask[tau != 0].sum(), total + (tau != 0).sum()
  assert abs(kept / total - 0.3) < 0.03
  assert any(not np.array_equal(got[n], got3[n]) for n in b)


def test_dare_ties_uses_the_documented_masks(world):
  out = transforms.apply("dare", world["paths"], {"density": 0.5, "seed": 3, "combine": "ties", "scale": 0.8})
  assert out.report["passes_over_inputs"] == 2

  def expected(n, b, fs):
    taus = [
      np.where(np.asarray(jax.random.bernoulli(merging.leaf_key(3, i, n), 0.5, b.shape)), (f - b) / 0.5, 0)
      for i, f in enumerate(fs)
    ]
    return b + 0.8 * np_ties(taus)

  assert_close(out, per_leaf(expected, world["base"], world["fts"]))


@pytest.mark.parametrize("t", [0.3, "[('blocks/.*', (0.0, 1.0)), ('.*', 0.25)]"])
def test_slerp_matches_mergekit_formula(world, t):
  paths = world["paths"][:2]
  out = transforms.apply("slerp", paths, {"t": t})

  def expected(n, b, fs):
    if isinstance(t, str):
      tt = [0.0, 1.0] if n.startswith("blocks/") else [0.25]
      return np.concatenate([np_slerp(tt[r], fs[0][r : r + 1], fs[1][r : r + 1]) for r in range(fs[0].shape[0])])
    return np_slerp(t, fs[0], fs[1])

  assert_close(out, per_leaf(expected, world["base"], world["fts"][:2]))


def test_slerp_parallel_vectors_fall_back_to_lerp():
  v = np.array([[1.0, 2.0, 3.0]])
  got = merging._slerp([v], [2.0 * v], [np.array([0.25])], stacked=(False,))[0]
  np.testing.assert_allclose(np.asarray(got), 1.25 * v, rtol=1e-6)


def test_model_stock_matches_pairwise_angle_formula(world):
  out = transforms.apply("model_stock", world["paths"])
  assert out.report["passes_over_inputs"] == 1
  assert_close(out, per_leaf(lambda n, b, fs: np_model_stock(b, fs), world["base"], world["fts"]), atol=2e-5)


# ---------------------------------------------------------------------------- identities


def test_identities(world):
  paths, fts = world["paths"], world["fts"]
  ta_mean = transforms.apply("task_arithmetic", paths, {"weights": str((1 / 3,) * 3)})
  # TIES with density 1 and agreeing signs = task arithmetic's mean: make every task vector agree in sign.
  agree = [jax.tree.map(lambda b, f: b + np.abs(f - b) + 1 / 8, world["base"], f) for f in fts]
  dataset, config = world["dataset"], world["config"]
  apaths = [
    save(world["root"] / f"agree{i}", p, config, dataset, {"init_from": world["base_path"], "step": 0})
    for i, p in enumerate(agree)
  ]
  ties = transforms.apply("ties_merge", apaths, {"density": 1.0})
  ta = transforms.apply("task_arithmetic", apaths, {"weights": str((1 / 3,) * 3)})
  assert trees.allclose(ties.theta, ta.theta, atol=1e-6)
  # DARE with density 1 = task arithmetic
  dare = transforms.apply("dare", paths, {"density": 1.0, "weights": str((1 / 3,) * 3)})
  assert trees.allclose(dare.theta, ta_mean.theta, atol=1e-6)
  # SLERP at t = 0 / 1 returns the inputs
  for t, want in ((0.0, fts[0]), (1.0, fts[1])):
    assert trees.allclose(transforms.apply("slerp", paths[:2], {"t": t}).theta, want, atol=1e-6)
  # any merge of one fine-tune with lambda 1 returns it
  for name, args in (
    ("task_arithmetic", {}),
    ("ties_merge", {"density": 1.0}),
    ("dare", {"density": 1.0}),
    ("dare", {"density": 1.0, "combine": "ties"}),
    ("breadcrumbs", {"density": 1.0}),
  ):
    assert trees.allclose(transforms.apply(name, paths[:1], args).theta, fts[0], atol=1e-6), name


# ---------------------------------------------------------------------------- refusals


def test_base_from_provenance_or_explicit_and_refusals(world, tmp_path):
  explicit = transforms.apply("task_arithmetic", world["paths"], {"base": world["base_path"]})
  implied = transforms.apply("task_arithmetic", world["paths"])
  assert trees.allclose(explicit.theta, implied.theta, atol=0)
  config, dataset = world["config"], world["dataset"]
  stray = save(tmp_path / "stray", world["fts"][0], config, dataset, {"init_from": "/elsewhere", "step": 0})
  with (
    pytest.raises(ValueError, match=r"config.args.base: give the base .* stray: /elsewhere@0"),
    pytest.warns(engine.DifferentInitWarning),
  ):
    transforms.apply("ties_merge", world["paths"][:1] + [stray])
  wide = tiny_config()
  wide.model.width = 32
  module = build.model(wide.model, 10)
  p_wide = build.init_variables(module, jax.random.key(1), dataset.input_shape)["params"]
  other = save(tmp_path / "wide", p_wide, wide, dataset, {"init_from": world["base_path"], "step": 0})
  with pytest.raises(trees.TreeMismatchError, match=r"does not have the same parameter tree .* shape of"):
    transforms.apply("task_arithmetic", world["paths"][:1] + [other])
  with pytest.raises(trees.TreeMismatchError, match=r"base .* does not have the same parameter tree"):
    transforms.apply("task_arithmetic", world["paths"][:1], {"base": other})
  with pytest.raises(ValueError, match=r"config.args.density: 0.0 for .* outside \(0.0, 1.0\]"):
    transforms.apply("ties_merge", world["paths"], {"density": 0.0})
  with pytest.raises(ValueError, match=r"config.args.weights=.*got 2 weights for 3"):
    transforms.apply("task_arithmetic", world["paths"], {"weights": "(1, 2)"})
  with pytest.raises(ValueError, match=r"config.args.scale='x\[': not a number"):
    transforms.apply("task_arithmetic", world["paths"], {"scale": "x["})


def test_job_via_main_and_bad_input_exit_2(world, tmp_path):
  cmd = [
    sys.executable,
    "-m",
    "jaxlab.main",
    "--config=ml_collections_configs/transform.py:ties_merge",
    f"--config.inputs={','.join(world['paths'])}",
    "--config.args.density=0.5",
    "--config.args.scale=[('blocks/.*', (0.5, 1.0)), ('.*', 1.0)]",
    f"--workdir={tmp_path / 'out'}",
  ]
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  ld = checkpoint.load(str(tmp_path / "out"))
  ref = transforms.apply(
    "ties_merge", world["paths"], {"density": 0.5, "scale": "[('blocks/.*', (0.5, 1.0)), ('.*', 1.0)]"}
  )
  assert trees.allclose(ld.theta, ref.theta, atol=0)
  assert ld.meta["provenance"]["report"]["passes_over_inputs"] == 2
  bad = cmd[:-1] + ["--config.args.density=1.5", f"--workdir={tmp_path / 'bad'}"]
  proc = subprocess.run(bad, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert proc.returncode == 2 and "error: config.args.density: 1.5" in proc.stderr
  assert not os.path.exists(tmp_path / "bad" / "checkpoints")


# ---------------------------------------------------------------------------- sharding

SHARDED = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 " + os.environ.get("XLA_FLAGS", "")
    import jax, ml_collections, numpy as np
    from jaxlab.transforms import engine
    from jaxlab import checkpoint, trees
    assert len(jax.devices()) == 8
    inputs, out = sys.argv[1].split(","), sys.argv[2]
    jobs = [("ties_merge", {"density": "0.4"}), ("dare", {"density": "0.5", "combine": "ties", "seed": 1}),
            ("breadcrumbs", {"density": "0.7", "gamma": "0.1"}), ("model_stock", {})]
    for name, args in jobs:
      c = ml_collections.ConfigDict(dict(transform=name, inputs=tuple(inputs), args=args,
          sharding=dict(num_devices=8, fsdp=((".*kernel", -1), (".*pos_embed", 1)))))
      engine.run(c, os.path.join(out, name))
    print(json.dumps({"n_dev": len(jax.devices())}))
""")


def test_sharded_merges_equal_one_device(world, tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env["XLA_FLAGS"] = TEST_XLA_FLAGS
  proc = subprocess.run(
    [sys.executable, "-c", SHARDED, ",".join(world["paths"]), str(tmp_path)],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
    cwd=REPO,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1])["n_dev"] == 8
  for name, args in (
    ("ties_merge", {"density": "0.4"}),
    ("dare", {"density": "0.5", "combine": "ties", "seed": 1}),
    ("breadcrumbs", {"density": "0.7", "gamma": "0.1"}),
    ("model_stock", {}),
  ):
    single = transforms.apply(name, world["paths"], args).theta
    sharded = checkpoint.load(str(tmp_path / name)).theta
    diffs = trees.max_abs_diff(sharded, single)
    assert max(diffs.values()) <= 1e-6, (name, diffs)


# ---------------------------------------------------------------------------- the experiment


def _rows(accs: dict[str, list[float]], tasks=("a", "b"), seeds=(0, 1)) -> list[dict]:
  """Synthetic result rows: `accs[name]` = per-task test accuracy (the same for every seed, plus a seed offset)."""
  from jaxlab.pipelines import merging as exp
  return [exp._row(n, s, {t: {"test": v + 0.01 * s, "heldout": v} for t, v in zip(tasks, vals)}, tasks)
          for n, vals in accs.items() for s in seeds]


def test_experiment_preconditions_claims_and_stats():
  from jaxlab.experiments import aggregate, lookup
  from jaxlab.pipelines import merging as exp

  mc = ml_collections.ConfigDict(dict(min_gain=0.1, min_interference=0.2))
  accs = {
    "pretrained": [0.1, 0.1],
    "ft_a": [0.9, 0.2],
    "ft_b": [0.1, 0.8],
    "task_arithmetic": [0.5, 0.5],
    "ties": [0.6, 0.5],
    "dare_ties": [0.4, 0.5],
    "breadcrumbs": [0.5, 0.5],
  }
  rows = _rows(accs)
  pre = exp.preconditions(rows, ("a", "b"), (0, 1), mc)
  assert [p["holds"] for p in pre] == [True, True, True]
  assert pre[0]["value"] == pytest.approx(0.8) and pre[2]["value"] == pytest.approx((0.7 + 0.7) / 2)
  verdicts = {c["claim"].split(" ")[0]: c["verdict"] for c in exp.claims(rows, pre, ("a", "b"), (0, 1))}
  assert verdicts == {"TIES": "holds", "DARE": "does not hold", "Model": "does not hold"}  # breadcrumbs: a tie
  small = {**accs, "ties": [0.505, 0.5]}  # wins every seed by 0.25 points: below the minimum effect
  assert exp.claims(_rows(small), pre, ("a", "b"), (0, 1))[0]["verdict"] == "does not hold"
  groups = aggregate(rows + exp.upper_bound(rows, ("a", "b")))
  assert lookup(groups, name="ties")["mean"] == pytest.approx(0.555)
  assert lookup(groups, name="ties")["std"] == pytest.approx(np.std([0.55, 0.56], ddof=1))
  assert lookup(aggregate(rows + exp.upper_bound(rows, ("a", "b")), value="test_b"), name="upper_bound")["mean"] == (
    pytest.approx(0.805))
  assert lookup(groups, name="upper_bound")["mean"] == pytest.approx((0.905 + 0.805) / 2)
  exact = _rows({**accs, "pretrained": [0.2, 0.1], "ft_a": [0.3, 0.2]})  # 0.3 - 0.2 < 0.1 in floats
  assert exp.preconditions(exact, ("a", "b"), (0, 1), mc)[0]["holds"]
  weak = _rows({**accs, "ft_b": [0.1, 0.15]})
  pre = exp.preconditions(weak, ("a", "b"), (0, 1), mc)
  assert not pre[1]["holds"]
  assert {c["verdict"] for c in exp.claims(weak, pre, ("a", "b"), (0, 1))} == {"not tested"}


def test_merging_pipeline_smoke(tmp_path):
  import importlib.util

  from jaxlab import main

  spec = importlib.util.spec_from_file_location("merging_cfg", os.path.join(REPO, "ml_collections_configs/merging.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config("smoke")
  wd = tmp_path / "merging"
  main.run(cfg, str(wd))
  res = json.load(open(wd / "results.json"))
  assert {p["name"].split(" ")[0] for p in res["preconditions"]} >= {"ft_invert", "ft_rot90", "tasks"}
  assert all(c["verdict"] in ("holds", "does not hold", "not tested") for c in res["claims"])
  names = {r["name"] for r in res["rows"]}
  assert names == {
    "pretrained",
    "ft_invert",
    "ft_rot90",
    "uniform_soup",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "breadcrumbs",
    "model_stock",
  }
  for r in res["rows"]:
    assert set(r["accs"]) == {"mixed", "invert", "rot90"}
    if r.get("scale_search"):
      best = max(r["scale_search"], key=lambda x: x["heldout_mean"])
      assert float(r["args"]["scale"]) == best["scale"] and best["scale"] in (0.5, 1.0)
  # the written merge is the transform of the fine-tunes with the chosen scale, base from their init_from
  ta = next(r for r in res["rows"] if r["name"] == "task_arithmetic")
  seed_dir = wd / "seed_0"
  ref = transforms.apply("task_arithmetic", [str(seed_dir / "ft_invert"), str(seed_dir / "ft_rot90")], ta["args"])
  assert trees.allclose(checkpoint.load(str(seed_dir / "task_arithmetic")).theta, ref.theta, atol=0)
  assert checkpoint.load_meta(str(seed_dir / "task_arithmetic"))["provenance"]["report"]["base"] == str(
    seed_dir / "pretrain"
  )
  assert os.path.exists(wd / "results.md") and os.path.exists(wd / "merging.png")
  # each stage names its learning rate and task; a rerun skips every stage
  over = {s["name"]: s["request"] for s in res["stages"]}
  assert over["seed_0/pretrain"]["overrides"]["optimizer.lr"] == cfg.merging.pretrain_lr
  assert over["seed_0/ft_rot90"]["overrides"]["data.task"] == "rot90"
  assert over["seed_0/ties"]["args"]["scale"] == next(r for r in res["rows"] if r["name"] == "ties")["args"]["scale"]
  main.run(cfg, str(wd))
  assert all(s["skipped"] for s in json.load(open(wd / "results.json"))["stages"])


def test_tensorwise_equals_model_streaming(world):
  """merge_tensorwise (one tensor of every input at a time) = the transforms (one model at a time)."""
  b, fs = trees.flatten(world["base"]), [trees.flatten(f) for f in world["fts"]]
  for name, args, kw in (
    (
      "ties_merge",
      {"density": 0.3, "scale": 0.7, "layer_leaves": ""},
      dict(method="magnitude", density="0.3", lam="0.7", consensus=True, normalize=True),
    ),
    ("dare", {"density": 0.5, "seed": 2, "layer_leaves": ""}, dict(method="random", density="0.5", seed=2, lam="1.0")),
  ):
    want = trees.flatten(transforms.apply(name, world["paths"], args).theta)
    got = merging.merge_tensorwise(lambda i, n: fs[i][n], b.__getitem__, list(b), len(fs), weights="", **kw)
    for n in b:
      np.testing.assert_allclose(got[n], np.asarray(want[n]), atol=1e-6, err_msg=(name, n))


def test_digit_tasks_are_fixed_transformations_of_the_same_images():
  from jaxlab.data import digits_task as exp

  plain = exp.build(ml_collections.ConfigDict({"name": "digits_task", "task": "identity"}))
  x, y = plain.splits["test"].arrays["inputs"], plain.splits["test"].arrays["label"]
  for task, fn in (
    ("invert", lambda a: 1 - a),
    ("rot90", lambda a: np.rot90(a, 1, (1, 2))),
    ("flip", lambda a: a[:, :, ::-1]),
  ):
    ds = exp.build(ml_collections.ConfigDict({"name": "digits_task", "task": task}))
    np.testing.assert_array_equal(ds.splits["test"].arrays["inputs"], fn(x))
    np.testing.assert_array_equal(ds.splits["test"].arrays["label"], y)
  perm = exp.build(ml_collections.ConfigDict({"name": "digits_task", "task": "permute"})).splits["test"]
  np.testing.assert_array_equal(
    np.sort(perm.arrays["inputs"].reshape(len(x), -1), 1), np.sort(x.reshape(len(x), -1), 1)
  )
  mixed = exp.build(ml_collections.ConfigDict({"name": "digits_task", "task": "mixed"})).splits["test"]
  which = np.random.default_rng(5).integers(0, 5, len(x))
  np.testing.assert_array_equal(mixed.arrays["inputs"][which == 1], 1 - x[which == 1])
  with pytest.raises(ValueError, match="config.data.task: unknown task 'nope'"):
    exp.build(ml_collections.ConfigDict({"name": "digits_task", "task": "nope"}))


def test_magnitude_threshold_is_the_kth_smallest_value():
  rng = np.random.default_rng(0)
  a = np.abs(rng.integers(-3, 4, (3, 40)) / 8).astype(np.float32)  # many ties, zeros
  a[2] = np.abs(rng.standard_normal(40)).astype(np.float32)
  for k in range(1, 41):
    got = np.asarray(merging.magnitude_threshold(a, np.full(3, k, np.int32)))
    np.testing.assert_array_equal(got, np.sort(a, axis=1)[:, k - 1])
