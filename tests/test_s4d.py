"""S4D layer and sequence backbones: kernel == recurrence, FFT padding, bidirectional layout,
step mode == convolution, initial values, optimizer rules, bad inputs, and a pipeline smoke run."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import models, optim, trees
from jaxlab.models import s4d, sequence

# ----------------------------------------------------------------------------
# helpers: an independent float64 numpy reference
# ----------------------------------------------------------------------------


_kernel = jax.jit(s4d.ssm_kernel, static_argnums=(1, 2, 3))


def _np_params(p):
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  a = -np.exp(p["log_A_real"]) + 1j * p["A_imag"]
  return (np.exp(p["log_dt"]), a, p["B"][..., 0] + 1j * p["B"][..., 1], p["C"][..., 0] + 1j * p["C"][..., 1],
          p["D"])


def _np_disc(dt, a, b, disc):
  dta = dt[:, None] * a
  if disc == "zoh":
    da = np.exp(dta)
    return da, (da - 1) / a * b
  return (1 + dta / 2) / (1 - dta / 2), dt[:, None] / (1 - dta / 2) * b


def _np_recurrence(p, u, disc, channel=0):
  """Explicit recurrence x_k = dA x_{k-1} + dB u_k, y_k = 2 Re(C x_k) (no D); u: [L, H]."""
  dt, a, b, c, _ = _np_params(p)
  da, db = _np_disc(dt, a, b, disc)
  x = np.zeros_like(da)
  ys = []
  for u_k in u:
    x = da * x + db * u_k[:, None]
    ys.append(2 * np.real(np.sum(c[channel] * x, -1)))
  return np.stack(ys)


def _layer_params(init, h=3, n=8, bidirectional=False, seed=0, dt_max=0.1):
  layer = s4d.S4D(d_state=n, ssm_init=init, bidirectional=bidirectional, dt_max=dt_max)
  v = jax.jit(layer.init)(jax.random.key(seed), jnp.zeros((1, 4, h)))
  p = dict(v["params"])
  p.pop("output_linear")
  return p


# ----------------------------------------------------------------------------
# initial values
# ----------------------------------------------------------------------------


def test_initial_values_follow_the_paper():
  n = 16
  a, b = s4d.init_ab("lin", n)
  np.testing.assert_allclose(a.real, -0.5)
  np.testing.assert_allclose(a.imag, np.pi * np.arange(n // 2))
  np.testing.assert_allclose(b, 1.0)
  a, _ = s4d.init_ab("inv", n)
  np.testing.assert_allclose(a.real, -0.5)
  k = np.arange(n // 2)
  np.testing.assert_allclose(a.imag, n / np.pi * (n / (2 * k + 1) - 1))
  np.testing.assert_allclose(a.imag, [76.39, 22.07, 11.21, 6.55, 3.96, 2.32, 1.18, 0.34], atol=6e-3)
  a, _ = s4d.init_ab("real", n)
  np.testing.assert_allclose(a, -(k + 1.0))
  # LegS (N=64): Re A = -1/2; imaginary parts span 1303 .. 0.264 and track S4D-Inv (1283 .. 0.323)
  a, b = s4d.init_ab("legs", 64)
  np.testing.assert_allclose(a.real, -0.5, atol=1e-9)
  assert abs(a.imag.max() - 1303) < 1.0 and abs(a.imag.min() - 0.264) < 2e-3
  inv, _ = s4d.init_ab("inv", 64)
  assert abs(inv.imag.max() - 1283) < 1.0 and abs(inv.imag.min() - 0.323) < 2e-3
  assert np.all(np.abs(b.imag) <= 2.0)
  # the stored layer parameters: Re A = -exp(log_A_real) = -1/2, log dt inside [log dt_min, log dt_max]
  p = _layer_params("lin", h=64, n=n)
  np.testing.assert_allclose(np.exp(p["log_A_real"]), 0.5, rtol=1e-6)
  np.testing.assert_allclose(p["A_imag"][5], np.pi * np.arange(n // 2), rtol=1e-6)
  assert np.all(p["log_dt"] >= math.log(1e-3)) and np.all(p["log_dt"] <= math.log(1e-1))
  assert np.std(np.asarray(p["log_dt"])) > 0.5  # spread over the log range, not constant
  c = np.asarray(p["C"])
  assert c.shape == (1, 64, n // 2, 2) and 0.3 < c.var() < 0.7  # complex normal: each part N(0, 1/2)


# ----------------------------------------------------------------------------
# kernel == recurrence, FFT conv, bidirectional layout
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("disc", s4d.DISCS)
def test_vandermonde_kernel_equals_recurrence(disc):
  length = 50
  for init in s4d.INITS:
    p = _layer_params(init, dt_max=0.3)
    k = np.asarray(_kernel(p, length, disc, 16))[0]                    # 4 chunks, last partial
    impulse = np.zeros((length, 3))
    impulse[0] = 1.0
    ref = _np_recurrence(p, impulse, disc).T                          # impulse response [H, L]
    scale = np.abs(ref).max()
    np.testing.assert_allclose(k, ref, atol=2e-5 * scale, err_msg=f"{init}/{disc}")
    if init == "legs":   # one chunk == many chunks
      np.testing.assert_allclose(np.asarray(_kernel(p, length, disc, 4096))[0], k, atol=2e-5 * scale)


def test_fft_padded_to_2L_equals_direct_causal_conv_and_unpadded_does_not():
  rng = np.random.default_rng(0)
  length, h = 40, 3
  u = rng.standard_normal((2, length, h)).astype(np.float32)
  k = rng.standard_normal((h, length)).astype(np.float32) * np.exp(-np.arange(length) / 30)
  direct = np.zeros_like(u, dtype=np.float64)
  for t in range(length):
    for s in range(t + 1):
      direct[:, t] += k[:, s] * u[:, t - s]
  padded = np.asarray(s4d.causal_conv(jnp.asarray(u), jnp.asarray(k)))
  np.testing.assert_allclose(padded, direct, atol=1e-4)
  unpadded = np.asarray(s4d.causal_conv(jnp.asarray(u), jnp.asarray(k), pad=False))
  assert np.abs(unpadded - direct).max() > 0.1   # circular wrap-around


def test_bidirectional_layout_is_as_documented():
  rng = np.random.default_rng(1)
  length, h = 20, 2
  u = rng.standard_normal((1, length, h)).astype(np.float32)
  k0 = rng.standard_normal((h, length)).astype(np.float32)
  k1 = rng.standard_normal((h, length)).astype(np.float32)
  y = np.asarray(s4d.bidirectional_conv(jnp.asarray(u), jnp.asarray(k0), jnp.asarray(k1)))[0]
  ref = np.zeros((length, h))
  for t in range(length):
    for s in range(t + 1):
      ref[t] += k0[:, s] * u[0, t - s]
    for m in range(1, length - t):            # anti-causal half starts at u_{t+1}: k1_{m-1} u_{t+m}
      ref[t] += k1[:, m - 1] * u[0, t + m]
  np.testing.assert_allclose(y, ref, atol=1e-4)
  # and the layer's bidirectional kernel pair equals two recurrences (C channel 0 forward, 1 backward)
  p = _layer_params("inv", h=h, bidirectional=True)
  k = np.asarray(_kernel(p, length, "zoh", 1024))
  impulse = np.zeros((length, h))
  impulse[0] = 1.0
  for ch in (0, 1):
    ref = _np_recurrence(p, impulse, "zoh", channel=ch).T
    np.testing.assert_allclose(k[ch], ref, atol=2e-5 * np.abs(ref).max())


# ----------------------------------------------------------------------------
# step mode == convolution
# ----------------------------------------------------------------------------


def test_layer_step_mode_equals_convolution():
  h, n, length = 4, 8, 24
  layer = s4d.S4D(d_state=n, ssm_init="legs", disc="bilinear", dt_max=0.3)
  u = jax.random.normal(jax.random.key(2), (2, length, h))
  v = jax.jit(layer.init)(jax.random.key(3), u)
  apply = jax.jit(layer.apply)
  y_conv = apply(v, u)
  state0 = s4d.zero_state(2, h, n)
  y_chunk, state = apply(v, u, state=state0)                       # streaming a whole chunk
  np.testing.assert_allclose(y_chunk, y_conv, atol=1e-4)
  # two chunks with the carried state == one chunk
  y1, s1 = apply(v, u[:, :12], state=state0)
  y2, s2 = apply(v, u[:, 12:], state=s1)
  np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y_conv, atol=1e-4)
  np.testing.assert_allclose(s2, state, atol=1e-4)
  # single steps
  step = jax.jit(lambda x, s: layer.apply(v, x, state=s))
  s, ys = state0, []
  for t in range(length):
    y_t, s = step(u[:, t], s)
    ys.append(y_t)
  np.testing.assert_allclose(jnp.stack(ys, 1), y_conv, atol=1e-4)


def test_backbone_step_mode_equals_convolution():
  cfg = dict(name="s4d_seq", d_model=8, n_layers=2, d_state=8, causal=True, norm="batch", prenorm=True,
             vocab_size=7, output="per_position", out_dim=5, init="inv")
  model = models.build(cfg, 3)
  x = jax.random.randint(jax.random.key(4), (2, 12), 0, 8)
  v = jax.jit(model.init)(jax.random.key(5), x)
  # non-trivial batch statistics
  _, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
  v = {**v, **upd}
  y_conv = jax.jit(model.apply)(v, x)
  assert y_conv.shape == (2, 12, 5)
  step = jax.jit(lambda x_t, s: model.apply(v, x_t, state=s))
  s, ys = sequence.initial_state(cfg, 2), []
  for t in range(12):
    y_t, s = step(x[:, t], s)
    ys.append(y_t)
  np.testing.assert_allclose(jnp.stack(ys, 1), y_conv, atol=1e-4)


# ----------------------------------------------------------------------------
# backbones: shapes, causality, mask channel
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["s4d_seq", "transformer_seq"])
def test_causal_backbones_do_not_look_ahead(name):
  cfg = dict(name=name, d_model=8, n_layers=2, causal=True, output="per_position", out_dim=3, input_channels=2,
             mask_channel=True)
  if name == "s4d_seq":
    cfg["d_state"] = 4
  else:
    cfg.update(num_heads=2, max_len=16)
  model = models.build(cfg, 4)
  x = jax.random.normal(jax.random.key(6), (1, 16, 2))
  x2 = x.at[:, 10:].set(5.0)
  xm = jnp.concatenate([x, jnp.zeros((1, 16, 1))], -1)   # the zero mask channel appended explicitly
  v = jax.jit(model.init)(jax.random.key(7), x)
  assert v["params"]["encoder"]["kernel"].shape == (3, 8)     # input_channels + mask channel
  y, y2, ym = jax.jit(lambda v: (model.apply(v, x), model.apply(v, x2), model.apply(v, xm)))(v)
  np.testing.assert_allclose(y[:, :10], y2[:, :10], atol=1e-5)
  assert np.abs(np.asarray(y[:, 10:] - y2[:, 10:])).max() > 1e-3
  np.testing.assert_allclose(ym, y, atol=1e-6)
  # the bidirectional variant does look ahead
  model_b = models.build({**cfg, "causal": False}, 4)
  yb, yb2 = jax.jit(lambda: (lambda vb: (model_b.apply(vb, x), model_b.apply(vb, x2)))(
      model_b.init(jax.random.key(7), x)))()
  assert np.abs(np.asarray(yb[:, :10] - yb2[:, :10])).max() > 1e-4


# ----------------------------------------------------------------------------
# optimizer rule: SSM params lr 0.001, no weight decay
# ----------------------------------------------------------------------------


def test_optimizer_rules_give_ssm_params_their_own_lr_and_no_decay():
  import ml_collections

  from jaxlab import configs
  model = models.build(dict(name="s4d_seq", d_model=4, n_layers=1, d_state=4, vocab_size=3), 2)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 6), jnp.int32))["params"]
  lr_rules, no_decay = s4d.optimizer_rules(0.01)
  cfg = configs.base().optimizer
  cfg.update(ml_collections.ConfigDict(dict(lr=0.01, weight_decay=0.1, schedule="constant", grad_clip=0.0,
                                            lr_rules=lr_rules, no_decay=tuple(cfg.no_decay) + no_decay)))
  tx, _ = optim.build(cfg, params, 10)
  grads = jax.tree.map(jnp.ones_like, params)
  upd, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
  flat_u, flat_p = trees.flatten(upd), trees.flatten(params)
  ssm = {k for k in flat_u if trees.first_match(k, [s4d.SSM_PARAMS]) is not None}
  assert ssm == {f"blocks/s4d/{n}" for n in ("log_dt", "log_A_real", "A_imag", "B")}
  for name in ssm:   # first Adam step with unit gradients: -lr * 1, no decay
    np.testing.assert_allclose(flat_u[name], -0.001, rtol=1e-4)
  for name in ("blocks/s4d/C", "blocks/s4d/D"):   # global lr and decoupled weight decay
    np.testing.assert_allclose(flat_u[name], -0.01 * (1 + 0.1 * np.asarray(flat_p[name])), rtol=1e-4)
  with pytest.raises(ValueError, match="positive"):
    s4d.optimizer_rules(0.0)


# ----------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
  # eval_shape: the errors are raised while tracing, nothing is compiled
  _shape = lambda m, x: jax.eval_shape(m.init, jax.random.key(0), x)  # noqa: E731
  x = jnp.zeros((1, 8, 1))
  with pytest.raises(ValueError, match="d_state"):
    s4d.init_ab("lin", 7)
  with pytest.raises(ValueError, match="model.init"):
    _shape(models.build(dict(name="s4d_seq", init="hippo"), 2), x)
  with pytest.raises(ValueError, match="model.disc"):
    _shape(models.build(dict(name="s4d_seq", disc="euler"), 2), x)
  with pytest.raises(ValueError, match="unknown keys"):
    models.build(dict(name="s4d_seq", dstate=4), 2)
  with pytest.raises(ValueError, match="num_heads"):
    models.build(dict(name="transformer_seq", d_model=10, num_heads=4), 2)
  with pytest.raises(ValueError, match="input_channels"):
    _shape(models.build(dict(name="s4d_seq", input_channels=3), 2), x)
  with pytest.raises(ValueError, match="expected int tokens"):
    _shape(models.build(dict(name="s4d_seq", vocab_size=5), 2), x)
  with pytest.raises(ValueError, match="causal"):
    _shape(models.build(dict(name="s4d_seq", causal=True, bidirectional=True), 2), x)
  with pytest.raises(ValueError, match="max_len"):
    _shape(models.build(dict(name="transformer_seq", max_len=4), 2), x)
  with pytest.raises(ValueError, match="step"):
    layer = s4d.S4D(d_state=4, bidirectional=True)
    jax.eval_shape(lambda: layer.apply(layer.init(jax.random.key(0), x), x, state=s4d.zero_state(1, 1, 4)))


# ----------------------------------------------------------------------------
# the experiment pipeline, smoke settings, through the real entry point's library call
# ----------------------------------------------------------------------------


def _load_config(arg):
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "ml_collections_configs" / "s4d.py"
  spec = importlib.util.spec_from_file_location("s4d_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_pipeline_smoke_writes_results_and_resumes(tmp_path):
  import json

  from jaxlab import main
  cfg = _load_config("smoke")
  out = main.run(cfg, str(tmp_path))
  assert out["runs"] == 2
  res = json.loads((tmp_path / "results.json").read_text())
  assert [(r["init"], r["disc"], r["seed"]) for r in res["rows"]] == [("lin", "zoh", 0), ("legs", "zoh", 0)]
  for r in res["rows"]:
    assert 0.0 <= r["test_acc"] <= 1.0 and r["pretraining"] == "none" and r["model"] == "s4d_seq"
  for f in ("results.md", "accuracy.png", "kernels.png"):
    assert (tmp_path / f).stat().st_size > 0
  # the stage's recorded overrides carry the SSM rule: peak lr min(ssm_lr, lr) = 1e-3 of lr 0.01
  stage = json.loads((tmp_path / "seq_digits/lin_zoh/seed0/stage.json").read_text())
  assert stage["summary"]["steps"] == 4
  assert stage["request"]["overrides"]["optimizer.lr_rules"][0][1] == pytest.approx(0.1)
  md = (tmp_path / "results.md").read_text()
  assert "`model.init='lin'`" in md and "| seq_digits | *majority class* | - |" in md
  # one seed: no noise estimate, so the Inv/LegS claim is never decided
  assert {c["verdict"] for c in res["claims"]} <= {"not tested"}
  # re-running skips the done stages and gives the same table
  again = main.run(cfg, str(tmp_path))
  assert again == out
  with pytest.raises(ValueError, match="smoke"):
    _load_config("big")
  cfg.s4d.inits = ("lin", "hippo")
  with pytest.raises(ValueError, match=r"config.s4d.inits: unknown \['hippo'\]"):
    main.run(cfg, str(tmp_path / "bad"))
  assert not (tmp_path / "bad" / "seq_digits").exists()  # refused before anything trained


def _report(table, trivial, workdir):
  import ml_collections

  from jaxlab.experiments import Experiment, Report
  from jaxlab.pipelines import s4d as s4d_pipeline
  cfg = ml_collections.ConfigDict({"s4d": {"x": 1}})
  rep = Report(Experiment(cfg, workdir, "s4d"), "t")
  s4d_pipeline.claims(rep, table, trivial, ml_collections.ConfigDict({"discs": ("zoh", "bilinear"),
                                                                        "inits": ("lin", "inv", "legs")}))
  return rep


def test_claims_need_a_learned_task_and_compare_within_two_std(tmp_path):
  row = lambda task, init, mean, std=0.0, disc="zoh": dict(task=task, init=init, disc=disc, mean=mean, std=std, n=3)  # noqa: E731
  table = [row("pf", "lin", 0.5), row("pf", "inv", 0.5), row("pf", "legs", 0.51),
           row("lo", "lin", 0.30, 0.01), row("lo", "inv", 0.31, 0.01), row("lo", "legs", 0.25, 0.01),
           row("lo", "lin", 0.305, 0.01, "bilinear"), row("sc", "inv", 0.34), row("sc", "legs", 0.30)]
  # the first-token shortcut: a model at 34% on "sc" has not beaten a 33% first-token predictor by 2 points
  trivial = {"pf": {"majority class": 0.5}, "lo": {"majority class": 0.15, "first token": 0.2},
             "sc": {"majority class": 0.15, "first token": 0.33}}
  rep = _report(table, trivial, str(tmp_path))
  pre = {p["name"].split(":")[0]: p for p in rep.preconditions}
  assert not pre["pf"]["holds"] and pre["pf"]["value"] == pytest.approx(0.01)
  assert pre["lo"]["holds"] and pre["lo"]["value"] == pytest.approx(0.11)  # 0.31 - max(0.15, 0.2)
  assert not pre["sc"]["holds"] and pre["sc"]["value"] == pytest.approx(0.01)  # 0.34 - 0.33
  assert "majority class / first token" in pre["sc"]["name"]
  verdicts = [(c["claim"], c["verdict"]) for c in rep.claims]
  assert verdicts == [("S4D-Inv and S4D-LegS perform alike on pf", "not tested"),
                      ("S4D-Inv and S4D-LegS perform alike on lo", "does not hold"),  # 6.0 > 2 * 1.0 points
                      ("ZOH vs bilinear makes little difference on lo", "holds"),  # 0.5 <= 2.0 points
                      ("S4D-Inv and S4D-LegS perform alike on sc", "not tested")]
  assert "6.0 vs 2.0 points" in rep.claims[1]["evidence"]
