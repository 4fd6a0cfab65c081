"""Learned soup (Wortsman et al., ICML 2022, App. I): trainable mixing weights over N frozen ingredients.

    config.parameterization = dict(name='soup_mixture', ingredients=('runs/ft0', 'runs/ft1', ...),
                                   granularity='tensor')

theta = {'mix_logits': ..., 'logit_scale': scalar (init 1)}. The ingredients'
params are constants (loaded once, never trained). materialize:

    alpha = softmax(mix_logits) over the N ingredients
    params[leaf] = sum_i alpha[leaf, i] * ingredient_i[leaf]
    params[scale_leaves] *= logit_scale        (the head: logits = scale * f(x; params))

granularity:
  'model'   one logit per ingredient (the paper's learned soup)
  'tensor'  one logit vector per parameter tensor (the paper's "by layer" soup,
            `learned_bylayer.py`); leaves matching `layer_leaves` (the ViT's
            depth-stacked `blocks/...`) get one vector per layer, shape [L, N],
            matching the per-layer tensors of the PyTorch reference.
Logits start at 0 (alpha = 1/N exactly), so at initialisation the learned soup
is the uniform soup. Because the head is linear, scaling its kernel and bias
by `logit_scale` is exactly `logit_scale * logits`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab import checkpoint, parameterizations, trees
from jaxlab.configs import as_paths


@parameterizations.register("soup_mixture")
class SoupMixture:
  """Mixing logits per model or per parameter tensor over frozen ingredient checkpoints.

  Args:
    model_cfg: the model config (unused: the ingredients fix the params tree).
    ingredients: checkpoint workdirs of the ingredients (fine-tunes of one model).
    granularity: 'tensor' (per parameter tensor, per layer for `layer_leaves`) or 'model'.
    layer_leaves: regexes of leaves whose leading axis is the depth axis.
    scale_leaves: regexes of the leaves multiplied by the logit scale (the linear head).
    learn_scale: whether to include the logit scale (else it stays 1 and is not in theta).

  Raises:
    ValueError: no ingredients, unknown granularity, or no leaf matching `scale_leaves`.
    CheckpointError: a missing ingredient checkpoint.
  """

  def __init__(self, model_cfg=None, ingredients: Sequence[str] = (), granularity: str = "tensor",
               layer_leaves: Sequence[str] = (r"blocks/.*",), scale_leaves: Sequence[str] = (r"head/.*",),
               learn_scale: bool = True):
    del model_cfg
    self.ingredients = list(as_paths(ingredients))
    if not self.ingredients:
      raise ValueError("config.parameterization.ingredients: give the ingredient checkpoints of the learned soup")
    if granularity not in ("tensor", "model"):
      raise ValueError(f"config.parameterization.granularity: {granularity!r}; use 'tensor' or 'model'")
    for p in self.ingredients:
      checkpoint.resolve(p)
    self.granularity = granularity
    self.layer_leaves = tuple(layer_leaves)
    self.scale_leaves = tuple(scale_leaves)
    self.learn_scale = bool(learn_scale)
    self._stack = None

  @property
  def num_ingredients(self) -> int:
    return len(self.ingredients)

  def _logit_shape(self, name: str, leaf) -> tuple[int, ...]:
    n = self.num_ingredients
    if trees.first_match(name, self.layer_leaves) is not None and np.ndim(leaf) >= 1:
      return (np.shape(leaf)[0], n)
    return (n,)

  def init(self, rng, params) -> dict:
    """Uniform mixture (all logits 0) and logit scale 1 for a params tree like `params`."""
    del rng
    if self.learn_scale and not trees.select(params, self.scale_leaves):
      raise ValueError(f"config.parameterization.scale_leaves={list(self.scale_leaves)} match no parameter; "
                       f"names: {list(trees.flatten(params))[:8]} ...")
    if self.granularity == "model":
      theta = {"mix_logits": jnp.zeros((self.num_ingredients,), jnp.float32)}
    else:
      theta = {"mix_logits": trees.map_with_names(
          lambda n, x: jnp.zeros(self._logit_shape(n, x), jnp.float32), params)}
    if self.learn_scale:
      theta["logit_scale"] = jnp.ones((), jnp.float32)
    return theta

  def stacked_ingredients(self) -> dict:
    """`{name: [N, ...] array}` of the ingredients' materialized params, loaded once (host memory)."""
    if self._stack is None:
      flats, ref = [], None
      for p in self.ingredients:
        with jax.ensure_compile_time_eval():  # first call may come from inside a jit trace
          params = jax.device_get(checkpoint.load(p).params)
        if ref is None:
          ref = params
        else:
          trees.check_same_structure(ref, params, f"learned soup ingredient {p} (vs {self.ingredients[0]})")
        flats.append({k: np.asarray(v) for k, v in trees.flatten(params).items()})
        del params
      self._stack = {k: np.stack([f[k] for f in flats]) for k in flats[0]}
    return self._stack

  def alphas(self, theta) -> dict:
    """Softmax mixing weights: `{leaf name: [..., N]}` ('tensor') or `{'*': [N]}` ('model')."""
    if self.granularity == "model":
      return {"*": jax.nn.softmax(theta["mix_logits"])}
    return {k: jax.nn.softmax(v, axis=-1) for k, v in trees.flatten(theta["mix_logits"]).items()}

  def materialize(self, theta) -> dict:
    """params = softmax-weighted sum of the ingredients, head scaled by the logit scale."""
    stack = self.stacked_ingredients()
    alphas = self.alphas(theta)
    if self.granularity == "tensor" and alphas.keys() != stack.keys():
      missing = sorted(set(stack) - set(alphas))[:3]
      raise ValueError(f"soup_mixture: mixing logits do not match the ingredients' params (e.g. {missing})")
    scale = theta.get("logit_scale")
    out = {}
    for name, s in stack.items():
      s = jnp.asarray(s)
      a = alphas["*"] if self.granularity == "model" else alphas[name]
      if a.ndim == 2:  # [L, N]: one mixture per layer of a depth-stacked leaf
        mixed = jnp.einsum("ln,nl...->l...", a, s.astype(jnp.float32))
      else:
        mixed = jnp.tensordot(a, s.astype(jnp.float32), axes=1)
      if scale is not None and trees.first_match(name, self.scale_leaves) is not None:
        mixed = mixed * scale
      out[name] = mixed.astype(s.dtype)
    return trees.unflatten(out)
