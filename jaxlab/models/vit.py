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

`final_norm='tokens'` applies the final LayerNorm to every token before pooling
(DeiT, TLEG auxiliary nets); `final_norm='pooled'` applies it after global
average pooling (timm's `fc_norm`, TLEG descendants). Every block's output is
sown into the `intermediates` collection as `blocks/features` [L, B, T, D] for
feature distillation.
"""

from __future__ import annotations

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


def dense(features: int, name: str, use_bias: bool = True, dtype=None) -> nn.Dense:
  return nn.Dense(features, name=name, use_bias=use_bias, kernel_init=trunc_normal,
                  bias_init=nn.initializers.zeros, dtype=dtype)


class Attention(nn.Module):
  num_heads: int
  dense_factory: Callable[..., nn.Module] = dense
  dropout: float = 0.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    b, t, d = x.shape
    h = self.num_heads
    qkv = self.dense_factory(3 * d, name="qkv", dtype=self.dtype)(x)
    qkv = qkv.reshape(b, t, 3, h, d // h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // h).astype(np.float32)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    attn = nn.Dropout(self.dropout)(attn, deterministic=not train)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, t, d)
    return self.dense_factory(d, name="proj", dtype=self.dtype)(out)


class Mlp(nn.Module):
  hidden: int
  dense_factory: Callable[..., nn.Module] = dense
  dropout: float = 0.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    d = x.shape[-1]
    x = self.dense_factory(self.hidden, name="fc1", dtype=self.dtype)(x)
    x = nn.gelu(x, approximate=False)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = self.dense_factory(d, name="fc2", dtype=self.dtype)(x)
    return nn.Dropout(self.dropout)(x, deterministic=not train)


class Block(nn.Module):
  """Pre-LayerNorm transformer block; `drop_path` is this layer's stochastic depth rate."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attn_dropout: float = 0.0
  ln_eps: float = 1e-6
  dense_factory: Callable[..., nn.Module] = dense
  dtype: Any = None

  def _drop_path(self, y, rate, train):
    if not train:
      return y
    keep = 1.0 - rate
    rng = self.make_rng("dropout")
    mask = jax.random.bernoulli(rng, keep, (y.shape[0],) + (1,) * (y.ndim - 1))
    return jnp.where(mask, y / jnp.maximum(keep, 1e-6), 0.0).astype(y.dtype)

  @nn.compact
  def __call__(self, x, drop_path, train: bool):
    y = nn.LayerNorm(epsilon=self.ln_eps, name="norm1", dtype=self.dtype)(x)
    y = Attention(self.num_heads, self.dense_factory, self.attn_dropout, self.dtype, name="attn")(y, train)
    x = x + self._drop_path(y, drop_path, train)
    y = nn.LayerNorm(epsilon=self.ln_eps, name="norm2", dtype=self.dtype)(x)
    y = Mlp(self.mlp_dim, self.dense_factory, self.dropout, self.dtype, name="mlp")(y, train)
    x = x + self._drop_path(y, drop_path, train)
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

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.ndim == 2:  # [B, T] 1D signal with one channel
      x = x[..., None]
    if x.ndim == 3:
      embed = nn.Conv(self.width, (self.patch_size,), strides=(self.patch_size,), padding="VALID",
                      name="patch_embed", kernel_init=trunc_normal, dtype=self.dtype)
    else:
      embed = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                      padding="VALID", name="patch_embed", kernel_init=trunc_normal, dtype=self.dtype)
    x = embed(x.astype(self.dtype or jnp.float32))
    b = x.shape[0]
    x = x.reshape(b, -1, self.width)
    if self.pool == "cls":
      cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width))
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)).astype(x.dtype), x], axis=1)
    elif self.pool != "gap":
      raise ValueError(f"model.pool must be 'cls' or 'gap', got {self.pool!r}")
    pos = self.param("pos_embed", trunc_normal, (1, x.shape[1], self.width))
    x = nn.Dropout(self.dropout)(x + pos, deterministic=not train)

    rates = jnp.linspace(0.0, self.drop_path, self.depth) if self.depth > 1 else jnp.zeros((1,))
    blocks = nn.scan(
        Block,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0, nn.broadcast),
        length=self.depth,
    )(self.num_heads, self.mlp_dim, self.dropout, self.attn_dropout, self.ln_eps,
      self.dense_factory, self.dtype, name="blocks")
    x, _ = blocks(x, rates, train)

    norm = nn.LayerNorm(epsilon=self.ln_eps, name="norm", dtype=self.dtype)
    if self.final_norm == "tokens":
      x = norm(x)
      x = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
    elif self.final_norm == "pooled":
      x = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
      x = norm(x)
    else:
      raise ValueError(f"model.final_norm must be 'tokens' or 'pooled', got {self.final_norm!r}")
    if self.num_classes <= 0:
      return x
    return nn.Dense(self.num_classes, name="head", kernel_init=trunc_normal,
                    dtype=self.dtype)(x).astype(jnp.float32)


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
  dtype = kw.pop("dtype", None)
  return ViT(num_classes=num_classes, dtype=jnp.dtype(dtype) if dtype else None, **kw)
