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
