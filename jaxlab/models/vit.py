"""A DeiT-style Vision Transformer in Flax Linen with blocks stacked on a depth axis.

Parameter paths (every block leaf has a leading depth axis of size `depth`):

    patch_embed/kernel [p, p, C, D] (or [p, C, D] for 1D inputs), patch_embed/bias [D]
    cls_token [1, 1, D]                        (only when pool == 'cls')
    pos_embed [1, T, D]
    blocks/norm1/{scale,bias} [L, D]
    blocks/attn/qkv/{kernel [L, D, 3D], bias [L, 3D]}
    blocks/attn/proj/{kernel [L, D, D], bias [L, D]}
    blocks/norm2/{scale,bias} [L, D]
    blocks/mlp/fc1/{kernel [L, D, M], bias [L, M]}
    blocks/mlp/fc2/{kernel [L, M, D], bias [L, D]}
    norm/{scale,bias} [D]                      final LayerNorm
    head/{kernel [D, K], bias [K]}

Options that timm / DeiT checkpoints need (all off by default, so existing
checkpoints keep their trees): `class_token=True` with `pool='gap'` (a class
token that average pooling skips, as timm's `global_pool='avg'`); `distilled`
(DeiT: `dist_token [1, 1, D]` after the class token and `head_dist/{kernel,bias}`;
the output is the mean of the two heads, timm's eval output); `layer_scale > 0`
(DeiT-III / CaiT LayerScale: `blocks/ls1/scale`, `blocks/ls2/scale` [L, D]
multiply the attention and MLP branches, initialised to `layer_scale`);
`no_embed_class` (`pos_embed [1, N_patches, D]` is added to the patches before
the prefix tokens are prepended, as DeiT-III and big_vision).

`final_norm='tokens'` applies the final LayerNorm to every token before pooling
(DeiT, TLEG auxiliary nets); `final_norm='pooled'` applies it after global
average pooling (timm's `fc_norm`, TLEG descendants). Every block's output is
sown into the `intermediates` collection as `blocks/features` [L, B, T, D] for
feature distillation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.models import registry

SIZES = {
    # name: (width, depth, heads, mlp_dim)
    "digits": (64, 4, 4, 128),
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
}

trunc_normal = nn.initializers.truncated_normal(stddev=0.02)

# `model.init_scheme`: how the ViT's kernels start (docs/fairness.md).
#   'fan_in' (default): every Dense kernel, the patch embedding and the head are truncated normal with variance
#     1/fan_in (LeCun; Flax's own Dense default up to the truncation), so a layer keeps its input's scale at any
#     width. Position embeddings and extra tokens stay at std 0.02 (they are added to, not multiplied with, the
#     stream). At width 32-64, std 0.02 leaves the residual branches ~10x smaller than the stream and the
#     head's logits ~0; the nets then sit near chance for hundreds of steps (issue 13).
#   'deit': std 0.02 everywhere (DeiT / timm `trunc_normal_(std=.02)`), the value tuned for widths 192-768;
#     what a DeiT recipe at ImageNet width should use. Imported checkpoints overwrite the init either way.
INIT_SCHEMES = ("fan_in", "deit")
DEFAULT_INIT_SCHEME = "fan_in"
fan_in_normal = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def check_init_scheme(scheme: str) -> str:
  """`scheme` if it names a ViT init scheme ('' = the default).

  Raises:
    ValueError: for an unknown name, naming `config.model.init_scheme` and the choices.
  """
  scheme = scheme or DEFAULT_INIT_SCHEME
  if scheme not in INIT_SCHEMES:
    raise ValueError(f"config.model.init_scheme: unknown {scheme!r}; choose from {', '.join(INIT_SCHEMES)}")
  return scheme


def kernel_init(scheme: str = DEFAULT_INIT_SCHEME):
  """The initializer of Dense / patch-embedding / head kernels under an init scheme (see `INIT_SCHEMES`).

  Inside the ViT's layer scan each layer's kernel is initialised with its own [d_in, d_out] shape, so
  'fan_in' uses d_in (the patch embedding: patch_size^2 * channels).
  """
  return fan_in_normal if check_init_scheme(scheme) == "fan_in" else trunc_normal


def factor_init(scheme: str, rank: int):
  """The initializer of each factor of a rank-`rank` product `u @ v` standing in for one Dense kernel.

  'fan_in': each factor gets variance 1/(its fan-in), so `x @ u @ v` has the variance of `x @ W` under
  'fan_in' (r * 1/d_in * 1/r = 1/d_in). 'deit': factors of std sqrt(0.02 / sqrt(rank)), so the product's entries
  have std about 0.02 like the dense DeiT init.
  """
  if check_init_scheme(scheme) == "fan_in":
    return fan_in_normal
  return nn.initializers.truncated_normal(stddev=float(np.sqrt(0.02 / np.sqrt(rank))))

# `model.remat` names -> jax.checkpoint policies (what the backward pass may keep from the forward pass of a
# block; everything else is recomputed). '' / 'none' = no rematerialisation.
REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,  # keep only block inputs: least memory
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # weight matmuls
    "everything_saveable": jax.checkpoint_policies.everything_saveable,  # keep all (same as none; for tests)
}
ATTENTION_IMPLS = ("", "xla", "cudnn", "einsum")


def remat_policy(name: str | None):
  """The jax.checkpoint policy named by `model.remat`, or None for no rematerialisation.

  Raises:
    ValueError: for an unknown name, listing the known ones.
  """
  if not name or name == "none":
    return None
  if name not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat: unknown policy {name!r}; choose from none, {', '.join(REMAT_POLICIES)}")
  return REMAT_POLICIES[name]


def dense(features: int, name: str, use_bias: bool = True, dtype=None, param_dtype=jnp.float32,
          init_scheme: str = DEFAULT_INIT_SCHEME) -> nn.Dense:
  """The ViT's Dense layer (the default `dense_factory`): kernel from `kernel_init(init_scheme)`, zero bias.

  A `dense_factory` is called with these arguments; the ViT passes its `init_scheme` by keyword.
  """
  return nn.Dense(features, name=name, use_bias=use_bias, kernel_init=kernel_init(init_scheme),
                  bias_init=nn.initializers.zeros, dtype=dtype, param_dtype=param_dtype)


@jax.custom_vjp
def gelu_exact(x):
  """The exact (erf) GELU, `jax.nn.gelu(x, approximate=False)`, with its analytic derivative as the backward.

  Same forward values bit for bit. Differentiating the erf formula makes jax save several [B, T, M]
  intermediates per block for the backward pass; this saves only `x` and computes
  `d/dx x Phi(x) = Phi(x) + x phi(x)` (the same function, equal to autodiff's gradient up to float rounding).
  On the CPU the MLP's forward+backward is about 5% faster (less memory traffic).
  """
  return jax.nn.gelu(x, approximate=False)


def _gelu_exact_fwd(x):
  return gelu_exact(x), x


def _gelu_exact_bwd(x, g):
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  cdf = 0.5 * (1.0 + jax.lax.erf(xf * np.float32(1 / np.sqrt(2))))
  pdf = jnp.exp(-0.5 * xf * xf) * np.float32(1 / np.sqrt(2 * np.pi))
  return ((g * (cdf + xf * pdf)).astype(x.dtype),)


gelu_exact.defvjp(_gelu_exact_fwd, _gelu_exact_bwd)


def einsum_attention(q, k, v, dropout_fn=None):
  """Softmax attention as two einsums over [B, T, heads, head_dim] q/k/v; softmax in float32.

  The reference for `jax.nn.dot_product_attention` (same layout, same float32 softmax), and the path used
  when attention dropout is active (dropout acts on the attention weights, which the fused call hides).
  """
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]).astype(np.float32)
  attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  if dropout_fn is not None:
    attn = dropout_fn(attn)
  return jnp.einsum("bhqk,bkhd->bqhd", attn, v)


class Attention(nn.Module):
  """Multi-head self-attention through `jax.nn.dot_product_attention` (the fused cuDNN kernel where jax has one).

  `impl`: '' (jax chooses), 'xla', 'cudnn', or 'einsum' (`einsum_attention`, also used whenever attention
  dropout is active in training). Softmax is always float32.
  """
  num_heads: int
  dense_factory: Callable[..., nn.Module] = dense
  dropout: float = 0.0
  dtype: Any = None
  param_dtype: Any = jnp.float32
  impl: str = ""

  @nn.compact
  def __call__(self, x, train: bool):
    b, t, d = x.shape
    h = self.num_heads
    qkv = self.dense_factory(3 * d, name="qkv", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    qkv = qkv.reshape(b, t, 3, h, d // h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.impl not in ATTENTION_IMPLS:
      raise ValueError(f"config.model.attention_impl: unknown {self.impl!r}; choose from {ATTENTION_IMPLS}")
    if self.impl == "einsum" or (train and self.dropout > 0):
      drop = nn.Dropout(self.dropout)
      out = einsum_attention(q, k, v, lambda a: drop(a, deterministic=not train))
    else:
      out = jax.nn.dot_product_attention(q, k, v, implementation=self.impl or None)
    return self.dense_factory(d, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(out.reshape(b, t, d))


class Mlp(nn.Module):
  hidden: int
  dense_factory: Callable[..., nn.Module] = dense
  dropout: float = 0.0
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    d = x.shape[-1]
    x = self.dense_factory(self.hidden, name="fc1", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    x = gelu_exact(x)  # = nn.gelu(x, approximate=False), with a leaner backward pass
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = self.dense_factory(d, name="fc2", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return nn.Dropout(self.dropout)(x, deterministic=not train)


class LayerScale(nn.Module):
  """LayerScale (timm `ls1`/`ls2`, param `scale` [D]): a learned per-channel gain on a residual branch."""
  init_value: float
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y):
    scale = self.param("scale", nn.initializers.constant(self.init_value), (y.shape[-1],), self.param_dtype)
    return y * scale.astype(y.dtype)


class Block(nn.Module):
  """Pre-LayerNorm transformer block; `drop_path` is this layer's stochastic depth rate."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attn_dropout: float = 0.0
  ln_eps: float = 1e-6
  dense_factory: Callable[..., nn.Module] = dense
  dtype: Any = None
  layer_scale: float = 0.0
  param_dtype: Any = jnp.float32
  attention_impl: str = ""

  def _scale(self, y, name: str):
    return LayerScale(self.layer_scale, self.param_dtype, name=name)(y) if self.layer_scale else y

  def _drop_path(self, y, rate, train):
    if not train:
      return y
    keep = 1.0 - rate
    rng = self.make_rng("dropout")
    mask = jax.random.bernoulli(rng, keep, (y.shape[0],) + (1,) * (y.ndim - 1))
    return jnp.where(mask, y / jnp.maximum(keep, 1e-6), 0.0).astype(y.dtype)

  @nn.compact
  def __call__(self, x, drop_path, train: bool):
    y = nn.LayerNorm(epsilon=self.ln_eps, name="norm1", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    y = Attention(self.num_heads, self.dense_factory, self.attn_dropout, self.dtype, self.param_dtype,
                  self.attention_impl, name="attn")(y, train)
    x = x + self._drop_path(self._scale(y, "ls1"), drop_path, train)
    y = nn.LayerNorm(epsilon=self.ln_eps, name="norm2", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    y = Mlp(self.mlp_dim, self.dense_factory, self.dropout, self.dtype, self.param_dtype, name="mlp")(y, train)
    x = x + self._drop_path(self._scale(y, "ls2"), drop_path, train)
    self.sow("intermediates", "features", x)
    return x, None


class ViT(nn.Module):
  """DeiT-style ViT for images [B, H, W, C] or 1D signals [B, T, C] / [B, T].

  Attributes:
    num_classes: classifier outputs; 0 returns the pooled representation.
    patch_size: square patch side for images, patch length for 1D signals.
    width, depth, num_heads, mlp_dim: transformer sizes.
    pool: 'cls' (class token) or 'gap' (global average pooling).
    final_norm: 'tokens' (LayerNorm per token, then pool) or 'pooled'.
    drop_path: maximum stochastic depth rate (linear over layers, as DeiT).
    class_token: a class token; None means `pool == 'cls'`.
    distilled: DeiT distillation token and `head_dist` (output: mean of the two heads).
    layer_scale: LayerScale init value; 0 means no LayerScale parameters.
    no_embed_class: position embeddings for the patches only (prefix tokens get none).
    dtype: compute dtype (bfloat16 for mixed precision; None = float32). Softmax, LayerNorm statistics and
      the returned logits are float32 whatever it is.
    param_dtype: parameter dtype (float32 master weights by default; the optimizer state follows it).
    remat: rematerialisation policy of the scanned blocks ('' / 'none', or a name in `REMAT_POLICIES`).
    scan_unroll: blocks per iteration of the layer scan (1 = a rolled loop; `depth` = fully unrolled).
    attention_impl: '' (jax chooses: cuDNN's fused kernel where it applies), 'xla', 'cudnn' or 'einsum'.
    init_scheme: 'fan_in' (default) or 'deit' (std 0.02 kernels); see `INIT_SCHEMES`.
  """
  num_classes: int
  patch_size: int = 2
  width: int = 64
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 128
  pool: str = "gap"
  final_norm: str = "tokens"
  dropout: float = 0.0
  attn_dropout: float = 0.0
  drop_path: float = 0.0
  ln_eps: float = 1e-6
  dense_factory: Callable[..., nn.Module] = dense
  dtype: Any = None
  class_token: bool | None = None
  distilled: bool = False
  layer_scale: float = 0.0
  no_embed_class: bool = False
  param_dtype: Any = jnp.float32
  remat: str = ""
  scan_unroll: int = 1
  attention_impl: str = ""
  init_scheme: str = DEFAULT_INIT_SCHEME

  def has_class_token(self) -> bool:
    """Whether the token sequence starts with a class token; checks the token options (no parameters needed).

    Raises:
      ValueError: pool, class_token and distilled that do not fit together.
    """
    if self.pool not in ("cls", "gap"):
      raise ValueError(f"model.pool must be 'cls' or 'gap', got {self.pool!r}")
    has_cls = self.pool == "cls" if self.class_token is None else bool(self.class_token)
    if (self.pool == "cls" or self.distilled) and not has_cls:
      raise ValueError("model.class_token=False needs model.pool='gap' and model.distilled=False")
    if self.distilled and (self.pool != "cls" or self.final_norm != "tokens"):
      raise ValueError("model.distilled needs model.pool='cls' and model.final_norm='tokens' (as DeiT)")
    return has_cls

  @nn.compact
  def __call__(self, x, train: bool = False):
    kinit = kernel_init(self.init_scheme)
    # Every Dense of the blocks gets the scheme too (a factory that takes `init_scheme`, as `dense` does).
    dense_factory = functools.partial(self.dense_factory, init_scheme=check_init_scheme(self.init_scheme))
    if x.ndim == 2:  # [B, T] 1D signal with one channel
      x = x[..., None]
    if x.ndim == 3:
      embed = nn.Conv(self.width, (self.patch_size,), strides=(self.patch_size,), padding="VALID",
                      name="patch_embed", kernel_init=kinit, dtype=self.dtype, param_dtype=self.param_dtype)
    else:
      embed = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                      padding="VALID", name="patch_embed", kernel_init=kinit, dtype=self.dtype,
                      param_dtype=self.param_dtype)
    x = embed(x.astype(self.dtype or jnp.float32))
    b = x.shape[0]
    x = x.reshape(b, -1, self.width)
    has_cls = self.has_class_token()
    prefix = []
    if has_cls:
      prefix.append(self.param("cls_token", nn.initializers.zeros, (1, 1, self.width), self.param_dtype))
    if self.distilled:
      prefix.append(self.param("dist_token", trunc_normal, (1, 1, self.width), self.param_dtype))
    prefix = [jnp.broadcast_to(t, (b, 1, self.width)).astype(x.dtype) for t in prefix]
    if self.no_embed_class:
      x = x + self.param("pos_embed", trunc_normal, (1, x.shape[1], self.width), self.param_dtype)
      x = jnp.concatenate([*prefix, x], axis=1)
    else:
      x = jnp.concatenate([*prefix, x], axis=1)
      x = x + self.param("pos_embed", trunc_normal, (1, x.shape[1], self.width), self.param_dtype)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)

    rates = jnp.linspace(0.0, self.drop_path, self.depth) if self.depth > 1 else jnp.zeros((1,))
    # The residual stream (the scan carry) stays in param_dtype (float32) under bfloat16 compute: `+ pos_embed`
    # promotes it, and each block adds its bfloat16 branch outputs to it. A bfloat16 stream cost 8 points of
    # digits accuracy at 200 steps; a float32 one 1 point (docs/performance.md).
    policy = remat_policy(self.remat)
    # `train` (argument 3, counting the module) stays a Python bool under remat. Inside a scan, CSE cannot undo
    # the rematerialisation, so prevent_cse=False (as jax/flax recommend there) leaves XLA free to fuse.
    block_cls = Block if policy is None else nn.remat(Block, policy=policy, prevent_cse=False, static_argnums=(3,))
    if not 1 <= int(self.scan_unroll) <= max(self.depth, 1):
      raise ValueError(f"config.model.scan_unroll={self.scan_unroll}: must be in [1, depth={self.depth}]")
    blocks = nn.scan(
        block_cls,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0, nn.broadcast),
        length=self.depth,
        unroll=int(self.scan_unroll),
    )(self.num_heads, self.mlp_dim, self.dropout, self.attn_dropout, self.ln_eps,
      dense_factory, self.dtype, layer_scale=self.layer_scale, param_dtype=self.param_dtype,
      attention_impl=self.attention_impl, name="blocks")
    x, _ = blocks(x, rates, train)

    norm = nn.LayerNorm(epsilon=self.ln_eps, name="norm", dtype=self.dtype, param_dtype=self.param_dtype)
    n_prefix = len(prefix)
    if self.final_norm == "tokens":
      x = norm(x)
    elif self.final_norm != "pooled":
      raise ValueError(f"model.final_norm must be 'tokens' or 'pooled', got {self.final_norm!r}")
    if self.distilled:  # DeiT: class and distillation tokens each get a head; the output is their mean
      if self.num_classes <= 0:
        return (x[:, 0] + x[:, 1]) / 2
      heads = [nn.Dense(self.num_classes, name=n, kernel_init=kinit, dtype=self.dtype,
                        param_dtype=self.param_dtype)(x[:, i])
               for i, n in enumerate(("head", "head_dist"))]
      return ((heads[0] + heads[1]) / 2).astype(jnp.float32)
    x = x[:, 0] if self.pool == "cls" else x[:, n_prefix:].mean(axis=1)  # timm's avg pool skips prefix tokens
    if self.final_norm == "pooled":
      x = norm(x)
    if self.num_classes <= 0:
      return x
    return nn.Dense(self.num_classes, name="head", kernel_init=kinit,
                    dtype=self.dtype, param_dtype=self.param_dtype)(x).astype(jnp.float32)


@registry.register("vit")
def build_vit(cfg, num_classes: int) -> ViT:
  """Builds a ViT from `model` config keys; `size` (digits/Ti/S/B) sets defaults."""
  kw = dict(cfg)
  kw.pop("name", None)
  size = kw.pop("size", None)
  if size:
    if size not in SIZES:
      raise ValueError(f"config.model.size: unknown ViT size {size!r}; choose from {sorted(SIZES)}")
    w, d, h, m = SIZES[size]
    for key, val in (("width", w), ("depth", d), ("num_heads", h), ("mlp_dim", m)):
      if kw.get(key) is None:
        kw[key] = val
  kw = {k: v for k, v in kw.items() if v is not None}
  kw["init_scheme"] = check_init_scheme(kw.get("init_scheme", ""))
  dtype = kw.pop("dtype", None)
  param_dtype = kw.pop("param_dtype", None)
  return ViT(num_classes=num_classes, dtype=_dtype(dtype, "dtype"),
             param_dtype=_dtype(param_dtype, "param_dtype") or jnp.float32, **kw)


def _dtype(name, key: str):
  """`jnp.dtype` of a `model.<key>` string ('' / None = unset), with a one-line error naming the key."""
  if not name:
    return None
  try:
    dt = jnp.dtype(name)
  except TypeError as e:
    raise ValueError(f"config.model.{key}: unknown dtype {name!r}; use float32, bfloat16 or float16") from e
  if not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"config.model.{key}: {name!r} is not a floating dtype; use float32, bfloat16 or float16")
  return dt
