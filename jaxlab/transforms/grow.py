"""Width growth of a WRN: MixtureGrowth (`grow_mixture`) and two baselines (`grow_random`, `grow_net2net`).

All three double the width of every stage (and of the stem) of a `wrn`
checkpoint; the grown model config has `stem_width * 2` and
`widen_factor * 2`.

- `grow_mixture` (2 inputs: member 0, member 1, both `template_mixing`): the
  grown template network. Diagonal blocks are the members' own mixtures; the
  off-diagonal blocks get new coefficient vectors over the members' learned
  templates (`c_2` over set 0, `c_3` over set 1) by one of four rules:
    orthogonal: `c_2` keeps its construction-time value (the untrained row of
        the orthogonal init, rebuilt from `coef_seed`); `c_3` is the last right
        singular vector of `stack(c_0, c_1, c_2)` times `noise`. This is the
        official default.
    copy:   `c_2 = c_0 + noise * u`, `c_3 = c_1 + noise * u`, `u` uniform(0,1) normalised.
    zero:   `c_2 = c_3 = 0`: function preserving (logits = sum of the members' logits, eval mode).
    random: uniform(0, 1) * noise.
  BatchNorms are concatenated channel-wise (member 0's statistics in the first
  half, member 1's in the second); a classifier bias is summed.
- `grow_random` (2 inputs, any parameterization): the dense grown network with
  the members' kernels on the diagonal and freshly Kaiming-initialised
  (dense, full fan-in) off-diagonal blocks ("growth with random new weights").
- `grow_net2net` (1 input): Net2WiderNet-style widening of one network by
  duplicating every channel: outputs copied, inputs of the next layer halved,
  so the function is preserved exactly at `noise = 0`; `noise` (relative to
  each kernel's std) breaks the symmetry of the copies.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import trees
from jaxlab.parameterizations import template_mixing as tm
from jaxlab.transforms import registry

REFERENCE = "arXiv:2311.04251 (MixtureGrowth, WACV 2024); github.com/chaudatascience/mixturegrowth"


def grown_model_cfg(model_cfg: dict) -> dict:
  """The model config of the doubled-width WRN.

  Raises:
    ValueError: when the input is not a `wrn`.
  """
  if model_cfg.get("name") != "wrn":
    raise ValueError(f"width growth needs a 'wrn' model, got {model_cfg.get('name')!r}")
  out = dict(model_cfg)
  out["stem_width"] = int(model_cfg.get("stem_width", 16)) * 2
  out["widen_factor"] = float(model_cfg.get("widen_factor", 2.0)) * 2
  return out


def _param_cfg(loaded) -> dict:
  return dict(loaded.meta.get("parameterization") or {"name": "identity"})


def _check_members(inputs) -> dict:
  """Validates two template-mixing member checkpoints; returns the shared parameterization config."""
  cfgs = [_param_cfg(x) for x in inputs]
  for i, (x, c) in enumerate(zip(inputs, cfgs)):
    if c.get("name") != "template_mixing":
      raise ValueError(f"grow_mixture: input {i} ({x.path}) is not a template network (parameterization "
                       f"{c.get('name', 'identity')!r}); train the members with "
                       "config.parameterization.name='template_mixing'")
    if int(c.get("member", 0)) == tm.GROWN:
      raise ValueError(f"grow_mixture: input {i} ({x.path}) is already grown (parameterization.member=-1); "
                       "give the two half-width member checkpoints")
    if int(c.get("member", 0)) != i:
      raise ValueError(f"grow_mixture: input {i} ({x.path}) is member {c.get('member', 0)}; give member 0 "
                       "first and member 1 second")
  for key in ("num_templates", "coef_seed"):
    if cfgs[0].get(key) != cfgs[1].get(key):
      raise ValueError(f"grow_mixture: the members differ in parameterization.{key} "
                       f"({cfgs[0].get(key)} vs {cfgs[1].get(key)})")
  m0, m1 = inputs[0].meta["model"], inputs[1].meta["model"]
  if m0 != m1:
    diff = sorted(k for k in set(m0) | set(m1) if m0.get(k) != m1.get(k))
    raise ValueError(f"grow_mixture: the members' model configs differ in {diff}")
  return cfgs[0]


def _new_coefs(rule: str, c0, c1, c2_init, noise: float, key):
  """New coefficient vectors `(c_2, c_3)` for the off-diagonal blocks of an inner conv."""
  k1, k2 = jax.random.split(key)
  if rule == "orthogonal":
    c2 = c2_init
    vh = jnp.linalg.svd(jnp.stack([c0, c1, c2]), full_matrices=True)[2]
    return c2, vh[-1] * noise
  if rule == "copy":
    u = jax.random.uniform(k1, c0.shape)
    u = u / jnp.linalg.norm(u)
    return c0 + noise * u, c1 + noise * u
  if rule == "zero":
    return jnp.zeros_like(c0), jnp.zeros_like(c1)
  if rule == "random":
    return jax.random.uniform(k1, c0.shape) * noise, jax.random.uniform(k2, c1.shape) * noise
  raise ValueError(f"unknown coefficient rule {rule!r}")


@functools.partial(jax.jit, static_argnames=("rule",))
def _grow_mixture_core(theta0, theta1, state0, state1, c2_init, key, noise, *, rule: str):
  """Pure, jit-compiled core: grown theta and model state from the two members'."""
  flat0, flat1 = trees.flatten(theta0), trees.flatten(theta1)
  out = {}
  names = sorted({k.rsplit("/", 1)[0] for k in flat0 if k.endswith("/coefs")})
  for i, name in enumerate(names):
    kind = tm.layer_kind(name)
    t = jnp.stack([flat0[f"{name}/templates"], flat1[f"{name}/templates"]])
    c0, c1 = flat0[f"{name}/coefs"], flat1[f"{name}/coefs"]
    if kind == "inner":
      c2, c3 = _new_coefs(rule, c0, c1, c2_init[name], noise, jax.random.fold_in(key, i))
      coefs = jnp.stack([c0, c1, c2, c3])
    else:
      coefs = jnp.stack([c0, c1])
    out[f"{name}/templates"], out[f"{name}/coefs"] = t, coefs
  for k, v in flat0.items():
    if k.endswith("/templates") or k.endswith("/coefs"):
      continue
    out[k] = v + flat1[k] if k == "head/bias" else jnp.concatenate([v, flat1[k]], axis=-1)
  s0, s1 = trees.flatten(state0), trees.flatten(state1)
  state = {k: jnp.concatenate([v, s1[k]], axis=-1) for k, v in s0.items()}
  return trees.unflatten(out), trees.unflatten(state)


@registry.register(
    "grow_mixture",
    idea="MixtureGrowth: double a template WRN's width; new blocks are new mixtures of the members' learned templates",
    reference=REFERENCE, inputs="2", same_tree=False)  # _check_members gives the specific errors
def grow_mixture(inputs, *, coefficients: Literal["orthogonal", "copy", "zero", "random"] = "orthogonal",
                 noise: float = 1.0, seed: int = 0):
  """Grows member 0 and member 1 (template checkpoints) into the full-width template network.

  Args:
    inputs: member 0 and member 1 of a template-mixing pair.
    coefficients: rule for the new coefficient vectors c_2, c_3
    noise: scale of the new coefficients / copy noise (coefs_noise_growing)
    seed: seed of the copy/random noise

  Raises:
    ValueError: when an input is not a template member, is already grown, or the members disagree.
  """
  pcfg = _check_members(inputs)
  model = grown_model_cfg(inputs[0].meta["model"])
  n = int(pcfg.get("num_templates", 2))
  coef_seed = int(pcfg.get("coef_seed", 0))
  names = sorted(k[: -len("/coefs")] for k in trees.flatten(inputs[0].theta) if k.endswith("/coefs"))
  c2_init = {nm: tm.coefficient_matrix(coef_seed, nm, 4, n)[2] for nm in names if tm.layer_kind(nm) == "inner"}
  theta, state = _grow_mixture_core(inputs[0].theta, inputs[1].theta, inputs[0].model_state,
                                    inputs[1].model_state, c2_init, jax.random.key(seed), float(noise),
                                    rule=coefficients)
  new_coefs = {nm: np.asarray(v)[2:].tolist() for nm, v in tm.coefficients(theta).items() if nm in c2_init}
  return registry.Output(
      theta=theta, model_state=state,
      meta={"model": model, "parameterization": {"name": "template_mixing", "num_templates": n, "member": tm.GROWN,
                                                 "coef_seed": coef_seed}},
      report={"coefficients": coefficients, "layers": len(names), "params": trees.count(theta),
              "new_coefs_example": next(iter(new_coefs.items()), None)})


# ----------------------------------------------------------------------------
# Dense baselines
# ----------------------------------------------------------------------------


def _dense_kernel_std(kind: str, full_shape) -> float:
  """Kaiming (fan_in, ReLU gain) std of a dense full-width kernel."""
  fan_in = int(np.prod(full_shape[:-1]))
  return float(np.sqrt(2.0 / fan_in))


@jax.jit
def _grow_random_core(p0, p1, state0, state1, key):
  f0, f1 = trees.flatten(p0), trees.flatten(p1)
  out = {}
  for i, (k, v) in enumerate(f0.items()):
    kind = tm.layer_kind(k)
    w1 = f1[k]
    if kind == "inner":
      full = (*v.shape[:-2], 2 * v.shape[-2], 2 * v.shape[-1])
      std = _dense_kernel_std(kind, full)
      r2, r3 = jax.random.normal(jax.random.fold_in(key, i), (2, *v.shape)) * std
      out[k] = tm.assemble(kind, [v, w1, r2, r3])
    elif kind is not None:
      out[k] = tm.assemble(kind, [v, w1])
    else:
      out[k] = v + w1 if k == "head/bias" else jnp.concatenate([v, w1], axis=-1)
  s0, s1 = trees.flatten(state0), trees.flatten(state1)
  return trees.unflatten(out), trees.unflatten({k: jnp.concatenate([v, s1[k]], -1) for k, v in s0.items()})


def _check_dense_inputs(name: str, inputs):
  for i, x in enumerate(inputs):
    if x.meta["model"].get("name") != "wrn":
      raise ValueError(f"{name}: input {i} ({x.path}) is a {x.meta['model'].get('name')!r} model, not a 'wrn'")
    if int(_param_cfg(x).get("member", 0)) == tm.GROWN:
      raise ValueError(f"{name}: input {i} ({x.path}) is already grown; give half-width networks")
  if len(inputs) == 2 and inputs[0].meta["model"] != inputs[1].meta["model"]:
    raise ValueError(f"{name}: the two inputs have different model configs")


@registry.register(
    "grow_random", idea="growth baseline: members' kernels on the diagonal, new off-diagonal blocks random (Kaiming)",
    reference=REFERENCE, inputs="2", same_tree=False)
def grow_random(inputs, *, seed: int = 0):
  """Dense doubled-width WRN from two half-width networks with random off-diagonal blocks.

  Args:
    inputs: two half-width WRN checkpoints.
    seed: seed of the random blocks

  Raises:
    ValueError: for a non-WRN or already grown input, or members of different shapes.
  """
  _check_dense_inputs("grow_random", inputs)
  theta, state = _grow_random_core(inputs[0].params, inputs[1].params, inputs[0].model_state,
                                   inputs[1].model_state, jax.random.key(seed))
  return registry.Output(theta=theta, model_state=state,
                         meta={"model": grown_model_cfg(inputs[0].meta["model"]),
                               "parameterization": {"name": "identity"}},
                         report={"params": trees.count(theta)})


@jax.jit
def _net2net_core(p, state, key, noise):
  out = {}
  for i, (k, v) in enumerate(trees.flatten(p).items()):
    kind = tm.layer_kind(k)
    if kind == "stem":
      w = jnp.concatenate([v, v], axis=-1)
    elif kind == "head":
      w = jnp.concatenate([v, v], axis=0) / 2
    elif kind == "inner":
      w = jnp.concatenate([v, v], axis=-1)
      w = jnp.concatenate([w, w], axis=-2) / 2
    else:
      out[k] = v if k == "head/bias" else jnp.concatenate([v, v], axis=-1)
      continue
    out[k] = w + noise * jnp.std(v) * jax.random.normal(jax.random.fold_in(key, i), w.shape)
  st = {k: jnp.concatenate([v, v], -1) for k, v in trees.flatten(state).items()}
  return trees.unflatten(out), trees.unflatten(st)


@registry.register(
    "grow_net2net", idea="Net2WiderNet-style baseline: duplicate every channel, halve the duplicated inputs",
    reference="arXiv:1511.05641 (Net2Net)", inputs="1")
def grow_net2net(inputs, *, noise: float = 0.0, seed: int = 0):
  """Dense doubled-width WRN by channel duplication (function preserving at noise 0).

  Args:
    inputs: one half-width WRN checkpoint.
    noise: Gaussian noise added to the kernels, relative to each kernel's std
    seed: seed of the noise

  Raises:
    ValueError: for a non-WRN or already grown input.
  """
  _check_dense_inputs("grow_net2net", inputs)
  theta, state = _net2net_core(inputs[0].params, inputs[0].model_state, jax.random.key(seed), float(noise))
  return registry.Output(theta=theta, model_state=state,
                         meta={"model": grown_model_cfg(inputs[0].meta["model"]),
                               "parameterization": {"name": "identity"}},
                         report={"params": trees.count(theta), "noise": noise})
