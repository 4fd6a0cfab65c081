"""PELA's weight perturbation regularizer (loss term `weight_perturbation`).

For every factorized layer `l` of the student (leaves `<layer>/u`, `<layer>/v`)
and every depth index, the rebuilt kernel `u @ v` is compared with the frozen
dense teacher's `<layer>/kernel`:

    R_l = (max_ij |(u v)_ij - K_ij| - eps)^2,   L_wp = mean over layers and depths of R_l

`max |.|` is the largest absolute entry (torch `norm(A, inf)` with `dim=None` in
the official code), not a matrix norm. Biases are not compared. The teacher's
kernels are constants (`stop_gradient`), so the gradient reaches only the
student factors. Note the official penalty is a plain square, not a hinge:
a deviation below `eps` is pulled *up* to `eps` as well; with `eps = 0` it is
the squared worst entry deviation.

Config: `objective.weights.weight_perturbation` (weight, 0 = off),
`objective.wp_eps` (eps, default 0.0), and `objective.teacher` (the dense checkpoint).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlab import objectives, trees


def factorized_layers(params) -> list[str]:
  """Paths of the layers that have `u` and `v` factors in a params tree."""
  flat = trees.flatten(params)
  return [n[:-2] for n in flat if n.endswith("/u") and f"{n[:-2]}/v" in flat]


def weight_perturbation_penalty(student_params, teacher_params, eps: float = 0.0) -> jax.Array:
  """`mean_l (max |u_l v_l - K_l| - eps)^2` over factorized layers (and depth indices).

  Args:
    student_params: materialized params of the low-rank student.
    teacher_params: params of the dense teacher (constants).
    eps: tolerated deviation.

  Returns:
    The scalar penalty (float32).

  Raises:
    ValueError: when the student has no factorized layers, the teacher lacks a
      kernel, or the shapes disagree.
  """
  if teacher_params is None:
    raise ValueError("weight_perturbation: no teacher params; set config.objective.teacher to the dense checkpoint")
  s, t = trees.flatten(student_params), trees.flatten(teacher_params)
  layers = factorized_layers(student_params)
  if not layers:
    raise ValueError("weight_perturbation: the student has no factorized layers (leaves '<layer>/u', '<layer>/v'); "
                     "use model.name='lowrank_vit'")
  penalties = []
  for layer in layers:
    kname = f"{layer}/kernel"
    if kname not in t:
      raise ValueError(f"weight_perturbation: the teacher has no {kname} for the student's factorized {layer}")
    u, v = s[f"{layer}/u"].astype(jnp.float32), s[f"{layer}/v"].astype(jnp.float32)
    w = jnp.einsum("...ir,...ro->...io", u, v)
    k = jax.lax.stop_gradient(t[kname]).astype(jnp.float32)
    if w.shape != k.shape:
      raise ValueError(f"weight_perturbation: {layer}: student u @ v is {w.shape}, teacher kernel is {k.shape}")
    dev = jnp.max(jnp.abs(w - k), axis=(-2, -1))
    penalties.append(((dev - eps) ** 2).reshape(-1))
  return jnp.mean(jnp.concatenate(penalties))


@objectives.register_term("weight_perturbation", needs=("teacher",))
def weight_perturbation(ctx: objectives.Context, cfg) -> jax.Array:
  """PELA weight perturbation term: see the module docstring."""
  return weight_perturbation_penalty(ctx.params, ctx.teacher_params, float(cfg.get("wp_eps", 0.0)))
