"""MixtureGrowth costs: template mixing overhead per training step, and the growth transform itself.

    python benchmarks/mixture_growth.py

Prints (no asserts): the time of one jitted forward+backward step of a dense
WRN and of the same WRN built from templates (materialize inside the step),
for the half-width member and the grown full-width net, and the wall time of
`grow_mixture` (first call with compilation, then a cached call).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax

from jaxlab import build, checkpoint, transforms, trees
from jaxlab.models import wrn

FULL = {"name": "wrn", "depth": 10, "widen_factor": 1.0, "stem_width": 16, "head_bias": False}
HALF = {**FULL, "widen_factor": 0.5, "stem_width": 8}
SHAPE, K, BATCH = (8, 8, 1), 10, 64


def step_time(model_cfg, pcfg, iters: int = 20) -> float:
  module = build.model(model_cfg, K)
  variables = build.init_variables(module, jax.random.key(0), SHAPE)
  params = variables.pop("params")
  param = build.parameterization(pcfg, model_cfg)
  theta = param.init(jax.random.key(1), params)
  x = jax.random.uniform(jax.random.key(2), (BATCH, *SHAPE))
  y = jnp.arange(BATCH) % K

  @jax.jit
  def grad(theta, state):
    def loss(t):
      logits, new = module.apply({"params": param.materialize(t), **state}, x, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
    return jax.grad(loss, has_aux=True)(theta)

  jax.block_until_ready(grad(theta, variables))
  t0 = time.perf_counter()
  for _ in range(iters):
    out = grad(theta, variables)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / iters


def member(m: int) -> checkpoint.Loaded:
  module = build.model(HALF, K)
  variables = build.init_variables(module, jax.random.key(m), SHAPE)
  pcfg = {"name": "template_mixing", "num_templates": 2, "member": m, "coef_seed": 0}
  param = build.parameterization(pcfg, HALF)
  theta = param.init(jax.random.key(3), variables.pop("params"))
  return checkpoint.Loaded(path=f"m{m}", step=0, meta={"model": HALF, "parameterization": pcfg}, theta=theta,
                           model_state=variables, module=module, parameterization=param)


def main():
  print(f"device: {jax.devices()[0].device_kind}; batch {BATCH}; 8x8 digits-sized inputs")
  print(f"forward MACs/example: member {wrn.forward_macs(HALF, K, SHAPE):,}, full {wrn.forward_macs(FULL, K, SHAPE):,}")
  for label, cfg, member_id in (("member (half width)", HALF, 0), ("grown (full width)", FULL, -1)):
    dense = step_time(cfg, {"name": "identity"})
    tmpl = step_time(cfg, {"name": "template_mixing", "num_templates": 2, "member": member_id})
    print(f"{label:20s} train step: dense {dense * 1e3:7.2f} ms, template {tmpl * 1e3:7.2f} ms, "
          f"ratio {tmpl / dense:.2f}")
  members = [member(0), member(1)]
  for attempt in ("first (compiles)", "second (cached)"):
    t0 = time.perf_counter()
    out = transforms.apply("grow_mixture", members, {"coefficients": "orthogonal"})
    jax.block_until_ready(out.theta)
    print(f"grow_mixture {attempt}: {time.perf_counter() - t0:.3f} s, grown trainable {trees.count(out.theta):,}")


if __name__ == "__main__":
  main()
