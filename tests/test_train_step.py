"""The train step's performance options change speed and memory, not the function computed.

dot_product_attention equals the einsum attention; remat and scan unrolling give the same loss and gradients;
bfloat16 compute keeps float32 master weights, optimizer state, logits and checkpoints, and trains the digits
job about as well as float32; `profile_steps` writes a trace; the benchmark's CPU path runs.
"""

import glob
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, run_main, tiny_config

from jaxlab import checkpoint, configs, models, optim, parameterizations, train, trees
from jaxlab.models import vit


def _tiny_vit(**kw):
  cfg = configs.vit_digits_model()
  cfg.update(dict(width=16, depth=3, num_heads=2, mlp_dim=32, patch_size=4, drop_path=0.1))
  cfg.update(kw)
  return models.build(cfg.to_dict(), 10)


def _loss_and_grads(module, params, x, y, train=True):
  def loss(p):
    logits = module.apply({"params": p}, x, train=train, rngs={"dropout": jax.random.key(3)})
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def digits_batch():
  rng = np.random.default_rng(0)
  return rng.standard_normal((8, 8, 8, 1)).astype(np.float32), rng.integers(0, 10, 8)


@pytest.fixture(scope="module")
def tiny_params(digits_batch):
  return _tiny_vit().init({"params": jax.random.key(0)}, digits_batch[0][:1])["params"]


@pytest.fixture(scope="module")
def base_loss_grads(tiny_params, digits_batch):
  """Loss and gradients of the default tiny ViT (no remat, rolled scan, dot_product_attention)."""
  return _loss_and_grads(_tiny_vit(), tiny_params, *digits_batch)


def test_dot_product_attention_equals_einsum_values_and_grads():
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 5, 3, 4)) for i in range(3))
  w = jax.random.normal(jax.random.key(9), (2, 5, 3, 4))  # a non-trivial cotangent
  fused = lambda q, k, v: jnp.sum(w * jax.nn.dot_product_attention(q, k, v))  # noqa: E731
  ref = lambda q, k, v: jnp.sum(w * vit.einsum_attention(q, k, v))  # noqa: E731
  np.testing.assert_allclose(jax.nn.dot_product_attention(q, k, v), vit.einsum_attention(q, k, v), atol=1e-6)
  for a, b in zip(jax.grad(fused, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)
  # softmax rows sum to one: attending to constant values returns them
  np.testing.assert_allclose(jax.nn.dot_product_attention(q, k, jnp.ones_like(v)), 1.0, atol=1e-6)


def test_gelu_exact_same_values_and_analytic_gradient():
  """The custom-VJP GELU: forward bit for bit jax's erf GELU; backward Phi(x) + x phi(x), equal to autodiff's."""
  z = jnp.linspace(-9.0, 9.0, 20001)
  np.testing.assert_array_equal(vit.gelu_exact(z), jax.nn.gelu(z, approximate=False))
  ours = jax.vmap(jax.grad(vit.gelu_exact))(z)
  np.testing.assert_allclose(ours, jax.vmap(jax.grad(lambda t: jax.nn.gelu(t, approximate=False)))(z), atol=1e-6)
  phi = np.exp(-0.5 * np.float64(z) ** 2) / np.sqrt(2 * np.pi)
  cdf = 0.5 * (1 + np.vectorize(math.erf)(np.float64(z) / np.sqrt(2)))
  np.testing.assert_allclose(ours, cdf + np.float64(z) * phi, atol=1e-6)
  assert jax.grad(lambda t: vit.gelu_exact(t).sum())(z.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_model_attention_impl_same_loss_and_grads(tiny_params, digits_batch, base_loss_grads):
  x, y = digits_batch
  base_loss, base_g = base_loss_grads
  loss, g = _loss_and_grads(_tiny_vit(attention_impl="einsum"), tiny_params, x, y)
  assert float(loss) == pytest.approx(float(base_loss), rel=1e-5)
  for name, a in trees.flatten(g).items():
    np.testing.assert_allclose(a, trees.flatten(base_g)[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(
  "over",
  [
    dict(remat="nothing_saveable"),
    dict(remat="dots_saveable"),
    dict(scan_unroll=3),
    dict(scan_unroll=2, remat="nothing_saveable"),
  ],
)
def test_remat_and_unroll_same_loss_and_grads(over, tiny_params, digits_batch, base_loss_grads):
  """Same params, same dropout key (drop_path > 0): rematerialising or unrolling the blocks changes nothing."""
  x, y = digits_batch
  base_loss, base_g = base_loss_grads
  loss, g = _loss_and_grads(_tiny_vit(**over), tiny_params, x, y)
  assert float(loss) == pytest.approx(float(base_loss), rel=1e-6)
  for name, a in trees.flatten(g).items():
    np.testing.assert_allclose(a, trees.flatten(base_g)[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_remat_recomputes_in_the_backward_pass(tiny_params, digits_batch):
  """nothing_saveable really rematerialises: the gradient program recomputes the blocks' matmuls."""
  x, y = digits_batch

  def n_dots(module):
    fn = jax.grad(lambda p: module.apply({"params": p}, x, train=False).sum())
    return str(jax.jit(fn).lower(tiny_params).as_text()).count("dot_general")

  assert n_dots(_tiny_vit(remat="nothing_saveable")) > n_dots(_tiny_vit())


@pytest.mark.parametrize(
  "key,value",
  [
    ("remat", "everything"),
    ("scan_unroll", 0),
    ("scan_unroll", 4),
    ("attention_impl", "flash"),
    ("dtype", "bf32"),
    ("param_dtype", "int8"),
  ],
)
def test_bad_performance_keys_name_the_key(key, value, digits_batch):
  with pytest.raises(ValueError, match=f"config.model.{key}"):
    _tiny_vit(**{key: value}).init({"params": jax.random.key(0)}, digits_batch[0][:1])


def test_bf16_compute_keeps_float32_master_weights_and_state(digits_batch):
  """dtype=bfloat16: params, grads, optimizer state and logits float32; matmuls in bfloat16."""
  x, y = digits_batch
  module = _tiny_vit(dtype="bfloat16")
  params = module.init({"params": jax.random.key(0)}, x[:1])["params"]
  assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  hlo = jax.jit(lambda p: module.apply({"params": p}, x)).lower(params).as_text()
  assert "bf16" in hlo
  cfg = configs.base()
  tx, _ = optim.build(cfg.optimizer, params, 10)
  state = {"step": jnp.zeros((), jnp.int32), "theta": params, "opt_state": tx.init(params), "model_state": {}}
  step = jax.jit(train.make_train_step(module, parameterizations.build({"name": "identity"}), tx, cfg.objective))
  new_state, metrics = step(state, {"inputs": x, "label": y}, jax.random.key(0))
  assert {a.dtype for a in jax.tree.leaves(new_state["theta"])} == {jnp.dtype(jnp.float32)}
  float_state = [a for a in jax.tree.leaves(new_state["opt_state"]) if jnp.issubdtype(a.dtype, jnp.floating)]
  assert {a.dtype for a in float_state} == {jnp.dtype(jnp.float32)}
  assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
  # bf16 logits agree with float32 ones to bfloat16 precision (8 bits of mantissa, a few layers deep)
  f32 = _tiny_vit().apply({"params": params}, x)
  bf16 = module.apply({"params": params}, x)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, f32, atol=0.05)
  # param_dtype=bfloat16 stores the weights in bfloat16 (the option for memory experiments)
  p16 = _tiny_vit(dtype="bfloat16", param_dtype="bfloat16").init({"params": jax.random.key(0)}, x[:1])["params"]
  assert {a.dtype for a in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}


def test_bf16_digits_run_trains_like_float32_and_checkpoints_float32(tmp_path):
  """A short digits run (200 steps) in bfloat16 ends within a few points of the same run in float32.

  The suite's budget is one short run of each; docs/performance.md records full-length runs over three seeds.
  """
  acc = {}
  for dtype in ("", "bfloat16"):
    cfg = tiny_config(steps=200, log_every=50)
    cfg.model = configs.vit_digits_model()
    cfg.model.depth, cfg.model.dtype = 2, dtype
    cfg.data.batch_size = 64
    cfg.optimizer.lr, cfg.optimizer.warmup_steps = 3e-3, 20
    cfg.objective.label_smoothing = 0.1
    wd = str(tmp_path / (dtype or "float32"))
    acc[dtype] = train.train_and_evaluate(cfg, wd)["test_accuracy"]
    loaded = checkpoint.load(wd)
    assert loaded.meta["model"]["dtype"] == dtype
    assert {a.dtype for a in jax.tree.leaves(loaded.theta)} == {np.dtype(np.float32)}
    assert {a.dtype for a in jax.tree.leaves(loaded.params)} == {np.dtype(np.float32)}
  assert acc[""] > 0.9  # measured 0.944 (float32) and 0.933 (bfloat16)
  assert abs(acc["bfloat16"] - acc[""]) <= 0.03, acc


def test_profile_steps_writes_a_trace(tmp_path):
  cfg = tiny_config(steps=4, profile_steps=2)
  train.train_and_evaluate(cfg, str(tmp_path))
  traces = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 1000


def test_profile_steps_zero_writes_nothing(tmp_path):
  train.train_and_evaluate(tiny_config(steps=2), str(tmp_path))
  assert not os.path.exists(tmp_path / "profile")


def test_main_refuses_bad_remat(tmp_path):
  wd = tmp_path / "wd"
  r = run_main(
    "--config=ml_collections_configs/digits_vit.py:smoke", f"--workdir={wd}", "--config.model.remat=everything"
  )
  assert r.returncode == 2
  err = r.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:") and "config.model.remat" in err[0], r.stderr
  assert not wd.exists() or not os.listdir(wd)


def test_peak_device_flops_lookup(monkeypatch):
  monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
  import train_step as bench

  assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(989.0)
  assert bench.peak_tflops("NVIDIA A100-SXM4-40GB", "bfloat16") == pytest.approx(312.0)
  assert bench.peak_tflops("cpu", "bfloat16") == 0.0
  # analytic FLOPs: 6 * params * tokens for the matmuls of a ViT without attention (tokens = 1)
  w, d, m = 8, 2, 16
  expected = 6 * d * (4 * w * w + 2 * w * m) + 12 * d * w
  assert bench.model_flops(w, d, m, batch=1, tokens=1, patch=1, channels=0, classes=0) == expected


def test_benchmark_cpu_path_runs():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run(
    [
      sys.executable,
      "benchmarks/train_step.py",
      "--size=digits",
      "--batch=4",
      "--steps=1",
      "--repeats=1",
      "--memory_remats=nothing_saveable",
      "--jax_only",
      "--memory",
      "--host_devices=2",  # the fast CPU recipe's process settings: 2 host devices, restart with glibc tunables
      "--malloc_hugepages",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=env,
    timeout=300,
  )
  assert r.returncode == 0, r.stderr
  assert "examples/s" in r.stdout and "peak memory" in r.stdout, r.stdout
  assert "cpu x2" in r.stdout and "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in r.stdout, r.stdout


def test_benchmark_torch_worker_env(monkeypatch):
  """PyTorch's worker process gets neither jaxlab's host devices nor the tunables the script itself set."""
  monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
  import train_step as bench

  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  monkeypatch.delenv(bench._TUNABLES_MARK, raising=False)
  env = bench.torch_env()
  assert "XLA_FLAGS" not in env and env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"  # the caller's: both sides
  monkeypatch.setenv(bench._TUNABLES_MARK, "1")
  env = bench.torch_env()
  assert "GLIBC_TUNABLES" not in env and bench._TUNABLES_MARK not in env
