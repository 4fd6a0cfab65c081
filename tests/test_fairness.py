"""Tests of the library pieces of fair experiments: init schemes, trivial baselines, length-masked pooling,
greedy-soup tie order, SWS split rules and loss-term gradient diagnostics (docs/fairness.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab import models


def _vit(scheme, width=32, depth=2, name="vit"):
  return models.build({"name": name, "width": width, "depth": depth, "num_heads": 2, "mlp_dim": 2 * width,
                       "patch_size": 2, "init_scheme": scheme}, 10)


def _kernel_stds(params):
  return {jax.tree_util.keystr(k): float(np.std(v)) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
          if jax.tree_util.keystr(k).endswith("['kernel']") or jax.tree_util.keystr(k).endswith("['pos_embed']")}


@pytest.mark.parametrize("width", [32, 128])
def test_fan_in_init_scales_kernels_with_width(width):
  params = _vit("fan_in", width).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
  std = _kernel_stds(params)
  # Var 1/fan_in: fc2 has fan-in 2*width, patch_embed 2*2*1 = 4; the embeddings keep std ~0.02.
  assert std["['blocks']['attn']['qkv']['kernel']"] == pytest.approx(width ** -0.5, rel=0.05)
  assert std["['blocks']['mlp']['fc2']['kernel']"] == pytest.approx((2 * width) ** -0.5, rel=0.05)
  assert std["['head']['kernel']"] == pytest.approx(width ** -0.5, rel=0.15)
  assert std["['patch_embed']['kernel']"] == pytest.approx(0.5, rel=0.3)
  assert std["['pos_embed']"] == pytest.approx(0.0176, rel=0.2)  # truncated normal(0.02) has std 0.88 * 0.02
  deit = _kernel_stds(_vit("deit", width).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"])
  assert all(v == pytest.approx(0.0176, rel=0.2) for v in deit.values()), deit


def test_lowrank_factors_follow_the_scheme():
  x = jax.random.normal(jax.random.key(1), (256, 8, 8, 1))
  for scheme in ("fan_in", "deit"):
    m = _vit(scheme, 64, 1, name="lowrank_vit")
    p = m.init(jax.random.key(0), x[:1])["params"]["blocks"]["mlp"]["fc1"]
    dense = _vit(scheme, 64, 1).init(jax.random.key(0), x[:1])["params"]["blocks"]["mlp"]["fc1"]["kernel"]
    # The product u @ v has the per-entry std of the dense kernel it replaces (within sampling noise).
    prod_std = float(np.std(np.asarray(p["u"][0]) @ np.asarray(p["v"][0])))
    assert prod_std == pytest.approx(float(np.std(dense)), rel=0.3 if scheme == "deit" else 0.1), scheme


def test_unknown_init_scheme_names_the_key():
  with pytest.raises(ValueError, match="config.model.init_scheme"):
    _vit("xavier")


def test_learngene_b_follows_the_scheme():
  from jaxlab.parameterizations import learngene as lg
  for scheme, want in (("fan_in", 32 ** -0.5), ("deit", 0.0176)):
    cfg = {"name": "vit", "width": 32, "depth": 4, "num_heads": 2, "mlp_dim": 64, "patch_size": 2,
           "init_scheme": scheme}
    params = models.build(cfg, 10).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    theta = lg.LinearLearngene(cfg).init(jax.random.key(1), params)
    assert float(np.std(theta["learngene"]["B"]["attn"]["qkv"]["kernel"])) == pytest.approx(want, rel=0.1)


def _train_digits_vit(scheme: str, steps: int) -> float:
  """Test accuracy of a width-32, depth-4 digits ViT after `steps` AdamW steps (batch 64, lr 2e-3)."""
  from jaxlab.data import digits
  x, y = digits.load_digits_arrays()
  idx = digits.split_indices(len(x))
  xtr, ytr = jnp.asarray(x[idx["train"]]), jnp.asarray(y[idx["train"]])
  m = models.build({"name": "vit", "width": 32, "depth": 4, "num_heads": 2, "mlp_dim": 64, "patch_size": 2,
                    "init_scheme": scheme}, 10)
  params = m.init(jax.random.key(0), xtr[:1])["params"]
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 2e-3, 20, steps), weight_decay=0.05)

  def loss(p, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(m.apply({"params": p}, xb), yb).mean()

  @jax.jit
  def train(p):
    def step(carry, i):
      p, st = carry
      b = jax.random.choice(jax.random.fold_in(jax.random.key(1), i), len(xtr), (64,), replace=False)
      u, st = tx.update(jax.grad(loss)(p, xtr[b], ytr[b]), st, p)
      return (optax.apply_updates(p, u), st), None
    return jax.lax.scan(step, (p, tx.init(p)), jnp.arange(steps))[0][0]

  params = train(params)
  return float((np.asarray(m.apply({"params": params}, x[idx["test"]])).argmax(-1) == y[idx["test"]]).mean())


def test_small_vit_leaves_chance_with_the_default_init():
  # Measured: fan_in 0.87 at 200 steps where the DeiT std-0.02 init gives 0.35 (chance 0.1).
  assert _train_digits_vit("", 200) > 0.7


# ---------------------------------------------------------------------------------------------------------
# Trivial baselines
# ---------------------------------------------------------------------------------------------------------


def test_majority_class_on_a_hand_made_split():
  from jaxlab import baselines
  assert baselines.majority_class([3, 1, 3, 2, 3, 1]) == {"class": 3, "accuracy": 0.5}
  # Fitted on another split: class 1 there scores 2/6 here.
  assert baselines.majority_class([3, 1, 3, 2, 3, 1], fit_labels=[1, 1, 0]) == {"class": 1, "accuracy": 2 / 6}
  with pytest.raises(ValueError, match="1D integer"):
    baselines.majority_class([0.5, 1.0])


def test_first_token_fits_on_train_scores_on_eval():
  from jaxlab import baselines
  fit_x = np.array([[1, 7], [1, 8], [1, 9], [2, 6], [2, 6], [4, 9]])
  fit_y = np.array([0, 0, 5, 9, 9, 4])
  # table: token 1 -> 0 (2 of 3), token 2 -> 9, token 4 -> 4; unseen token 3 -> the fit majority (0 and 9 tie
  # with two each: the smaller, 0).
  x = np.array([[1, 0], [2, 0], [2, 0], [3, 0], [4, 0]])
  y = np.array([0, 9, 1, 0, 7])
  out = baselines.first_token(fit_x, fit_y, x, y)
  assert out["table"] == {1: 0, 2: 9, 4: 4} and out["fallback"] == 0
  assert out["accuracy"] == pytest.approx(3 / 5)


def test_classification_baselines_on_listops():
  from jaxlab import baselines, data
  ds = data.get_dataset({"name": "listops", "max_length": 64, "train_size": 300, "validation_size": 50,
                         "test_size": 100, "heldout_size": 0})
  rows = {r["method"]: r["accuracy"] for r in baselines.classification_baselines(ds, "test")}
  y = ds.split("test").arrays["label"]
  assert rows["majority class"] == pytest.approx(np.bincount(y).max() / len(y))
  assert set(rows) == {"majority class", "first token"}
  assert 0.0 < rows["first token"] <= 1.0


def test_unigram_accuracy_and_loss():
  from jaxlab import baselines
  t = np.array([[5, 5, 2, 0], [5, 3, 3, 0]])
  m = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])  # scored: 5 5 2 5 3 -> '5' 3 of 5
  out = baselines.unigram(t, m)
  assert out["token"] == 5 and out["accuracy"] == pytest.approx(0.6)
  # p(5) = 3/5, p(2) = p(3) = 1/5: loss = -(3 log .6 + 2 log .2) / 5
  assert out["loss"] == pytest.approx(-(3 * np.log(0.6) + 2 * np.log(0.2)) / 5)
  # Fitted elsewhere with add-one smoothing over 6 ids: counts 2+1 for token 3, 1 for the others -> token 3.
  fit = baselines.unigram(t, m, fit_targets=np.array([[3, 3]]), vocab_size=6)
  assert fit["token"] == 3 and fit["accuracy"] == pytest.approx(0.2)
  assert fit["loss"] == pytest.approx(-(4 * np.log(1 / 8) + np.log(3 / 8)) / 5)


def test_position_mean_and_all_zero():
  from jaxlab import baselines
  t = np.array([[0.0, 1.0], [1.0, 1.0], [0.5, 0.0]])
  m = np.array([[1, 1], [1, 1], [1, 0]])
  z = baselines.all_zero(t, m)
  assert z["mae"] == pytest.approx((0 + 1 + 1 + 1 + 0.5) / 5) and z["mse"] == pytest.approx(3.25 / 5)
  pm = baselines.position_mean(t, m)
  # position 0 mean 0.5 (errors .5 .5 0), position 1 mean 1 over its two scored entries (errors 0 0).
  assert pm["mean"][:, 0].tolist() == [0.5, 1.0]
  assert pm["mae"] == pytest.approx(1.0 / 5) and pm["mse"] == pytest.approx(0.5 / 5)
  # Channels [N, L, C] average over C, as the L1 pretraining loss does.
  t3 = np.stack([t, 2 * t], -1)
  assert baselines.all_zero(t3, m)["mae"] == pytest.approx(1.5 * z["mae"])


# ---------------------------------------------------------------------------------------------------------
# Length-masked sequence classifiers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,causal,pool", [("s4d_seq", False, "mean"), ("s4d_seq", True, "last"),
                                              ("transformer_seq", False, "mean"), ("transformer_seq", True, "last")])
def test_padding_does_not_change_the_output(name, causal, pool):
  from jaxlab import build
  cfg = {"name": name, "vocab_size": 16, "d_model": 16, "n_layers": 2, "pool": pool, "causal": causal}
  if name == "s4d_seq":
    cfg["d_state"] = 8
  else:
    cfg.update(num_heads=2, max_len=64)
  rng = np.random.default_rng(0)
  lengths = np.array([3, 11, 20])
  short = np.zeros((3, 24), np.int32)
  for i, n in enumerate(lengths):
    short[i, :n] = rng.integers(1, 16, n)
  long = np.pad(short, ((0, 0), (0, 16)))  # 16 more padding tokens
  model = build.model(cfg, 10)
  v = model.init(jax.random.key(0), jnp.asarray(short))
  a, b = model.apply(v, jnp.asarray(short)), model.apply(v, jnp.asarray(long))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
  # The mean over the true length (pool='mean') equals the output of the unpadded sequence alone.
  if pool == "mean":
    alone = model.apply(v, jnp.asarray(short[:1, :3]))
    np.testing.assert_allclose(np.asarray(alone), np.asarray(a[:1]), atol=2e-5)
  # With padding honoured off (-1, every position computed and pooled) the extra padding moves the logits.
  off = build.model({**cfg, "pool_pad_id": -1}, 10)
  assert np.abs(np.asarray(off.apply(v, jnp.asarray(short)) - off.apply(v, jnp.asarray(long)))).max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Greedy soup order on ties
# ---------------------------------------------------------------------------------------------------------


def test_greedy_order_on_a_tied_table_matches_the_official_sort():
  import operator

  from jaxlab.transforms import soups
  accs = [0.90, 0.95, 0.95, 0.92, 0.95, 0.90]
  # The official code: a stable ascending sort of (name, accuracy) pairs by accuracy, then reverse.
  official = sorted(enumerate(accs), key=operator.itemgetter(1))
  official.reverse()
  assert soups.greedy_order(accs) == [i for i, _ in official] == [4, 2, 1, 3, 5, 0]
  assert soups.greedy_order(accs, "input") == [1, 2, 4, 3, 0, 5]
  rng = np.random.default_rng(0)
  for _ in range(50):  # random tables with many ties
    a = rng.integers(0, 4, size=7) / 4
    ref = sorted(enumerate(a.tolist()), key=operator.itemgetter(1))[::-1]
    assert soups.greedy_order(a) == [i for i, _ in ref]
  with pytest.raises(ValueError, match="ties"):
    soups.greedy_order(accs, "random")


# ---------------------------------------------------------------------------------------------------------
# SWS split rules
# ---------------------------------------------------------------------------------------------------------


def test_sws_even_split_gives_back_the_auxiliary_layout():
  from jaxlab.transforms.learngene import split_depth
  assert split_depth(8, (3, 2, 3)) == (3, 2, 3)
  assert split_depth(8, (3, 2, 3), "array_split") == (3, 3, 2)  # the former 'even'
  assert split_depth(12, (3, 3, 4, 3, 3)) == (3, 3, 2, 2, 2)  # the official code's one shipped split
  assert split_depth(16, (3, 3, 4, 3, 3)) == (3, 3, 4, 3, 3)
  assert split_depth(7, (3, 2, 3)) == (3, 2, 2) and split_depth(6, (3, 2, 3)) == (2, 2, 2)
  assert split_depth(9, (3, 2, 3)) == (3, 3, 3) and split_depth(10, (3, 2, 3)) == (4, 3, 3)  # grow the smallest
  rng = np.random.default_rng(0)
  for _ in range(30):
    aux = tuple(int(v) for v in rng.integers(1, 5, size=rng.integers(2, 6)))
    assert split_depth(sum(aux), aux) == aux
    for depth in range(len(aux), 3 * sum(aux)):
      split = split_depth(depth, aux)
      assert sum(split) == depth and min(split) >= 1
  for k in (1, 2, 3):  # equal auxiliary stages: np.array_split at every depth
    for depth in range(4, 20):
      assert split_depth(depth, (k,) * 4) == split_depth(depth, (k,) * 4, "array_split")


# ---------------------------------------------------------------------------------------------------------
# Loss-term gradient diagnostics
# ---------------------------------------------------------------------------------------------------------


def test_gradient_ratios_on_quadratics():
  from jaxlab.losses import diagnostics
  theta = {"a": jnp.array([3.0, 4.0]), "b": jnp.zeros(3)}

  def values(th):
    sq = 0.5 * sum(jnp.sum(x ** 2) for x in jax.tree.leaves(th))
    return {"task": sq, "side": 6.0 * th["b"][0], "along": 6.0 * th["a"][0]}

  out = diagnostics.gradient_ratios(values, theta, {"task": 1.0, "side": 0.5, "along": 0.5}, task="task")
  # task gradient = theta (norm 5); side: 3 at b[0]; along: 3 at a[0].
  assert out["task"]["ratio"] == pytest.approx(1.0) and out["task"]["cosine"] == pytest.approx(1.0)
  assert out["side"]["grad_norm"] == pytest.approx(3.0) and out["side"]["ratio"] == pytest.approx(0.6)
  assert out["side"]["cosine"] == pytest.approx(0.0) and out["side"]["touched"] == pytest.approx(1 / 5)
  assert out["along"]["cosine"] == pytest.approx(3.0 / 5.0) and out["task"]["value"] == pytest.approx(12.5)
  with pytest.raises(ValueError, match="task term"):
    diagnostics.gradient_ratios(values, theta, {"side": 1.0}, task="task")


def test_distillation_to_one_hot_teacher_pulls_like_cross_entropy_times_its_weight():
  import ml_collections

  from jaxlab import objectives
  from jaxlab.losses import diagnostics
  x = jax.random.normal(jax.random.key(0), (8, 5))
  label = jnp.arange(8) % 3
  # A teacher certain of the label: KL(onehot || softmax(s)) has the gradient of cross entropy, so the
  # distillation term's gradient is exactly `weight` times the task's, in the same direction.
  teacher_logits = 100.0 * jax.nn.one_hot(label, 3)

  def context_fn(w):
    return objectives.Context(logits=x @ w, batch={"label": label}, teacher_logits=teacher_logits)

  cfg = ml_collections.ConfigDict({"weights": {"cross_entropy": 1.0, "soft_distill": 0.25}, "temperature": 1.0})
  w = 0.3 * jax.random.normal(jax.random.key(1), (5, 3))
  out = diagnostics.objective_gradient_ratios(context_fn, w, cfg)
  assert out["soft_distill"]["ratio"] == pytest.approx(0.25, rel=1e-4)
  assert out["soft_distill"]["cosine"] == pytest.approx(1.0, abs=1e-5)
  assert out["cross_entropy"]["touched"] == 1.0


def test_make_context_fn_matches_the_train_step_loss():
  import ml_collections

  from jaxlab import parameterizations
  from jaxlab.losses import diagnostics
  module = _vit("fan_in", 16, 1)
  x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
  params = module.init(jax.random.key(1), x)["params"]
  cfg = ml_collections.ConfigDict({"weights": {"cross_entropy": 1.0}, "label_smoothing": 0.0})
  param = parameterizations.build({"name": "identity"})
  batch = {"inputs": x, "label": jnp.array([0, 1, 2, 3])}
  ctx_fn = diagnostics.make_context_fn(module, param, cfg, {}, batch, jax.random.key(2), train=False)
  out = diagnostics.objective_gradient_ratios(ctx_fn, params, cfg)
  logits = module.apply({"params": params}, x)
  want = float(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean())
  assert out["cross_entropy"]["value"] == pytest.approx(want, rel=1e-5)
  g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
      module.apply({"params": p}, x), batch["label"]).mean())(params)
  assert out["cross_entropy"]["grad_norm"] == pytest.approx(float(optax.tree.norm(g)), rel=1e-4)


# ---------------------------------------------------------------------------------------------------------
# ListOps at LRA sizes: the disk cache
# ---------------------------------------------------------------------------------------------------------


def test_large_listops_sets_are_cached_on_disk(tmp_path, monkeypatch):
  from jaxlab.data import sequences
  monkeypatch.setattr(sequences, "LISTOPS_CACHE_MIN_TOKENS", 1000)
  kw = dict(seed=5, min_length=10, max_length=64, max_depth=10, max_args=10)
  cfg = {"cache_dir": str(tmp_path)}
  x, y = sequences._cached_listops(cfg, 40, **kw)
  files = list(tmp_path.glob("listops_*.npz"))
  assert len(files) == 1
  x2, y2 = sequences._cached_listops(cfg, 40, **kw)  # read back
  want_x, want_y = sequences.generate_listops(40, **kw)
  np.testing.assert_array_equal(x, want_x)
  np.testing.assert_array_equal(x2, want_x)
  np.testing.assert_array_equal(y2, want_y)
  assert x2.dtype == np.int32
  sequences._cached_listops({"cache_dir": str(tmp_path), "cache": False}, 30, **kw)
  assert len(list(tmp_path.glob("listops_*.npz"))) == 1  # cache off: nothing written
