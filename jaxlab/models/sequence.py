"""Sequence backbones `s4d_seq` and `transformer_seq` with one interface (Flax Linen).

Both take tokens int [B, L] (`vocab_size > 0`: embedding of `vocab_size + 1` rows,
the last id being the denoising mask token) or values float [B, L, C] / [B, L]
(`vocab_size = 0`: a Dense encoder over `input_channels` (+1 mask channel when
`mask_channel`; inputs without it get a zero mask channel appended, so the same
model reads masked and clean inputs)). Blocks are stacked on a leading depth axis
(`nn.scan`). Output: `classify` -> pool ('mean' | 'last') -> logits [B, K];
`per_position` -> [B, L, out_dim].

Padding (`pool_pad_id`, token inputs): tokens equal to it are padding, and the
model computes over the true length only: each S4D layer's input is zeroed at
padded positions (so neither the causal nor the bidirectional convolution
carries padding into real positions), the Transformer's attention ignores
padded keys, `pool='mean'` averages the real positions and `pool='last'` takes
the last real one (the official S4 pipeline pools over the true length). The
outputs at real positions, and the pooled output, are then the same however
much padding follows the tokens (tested). Default (None): 0 for token inputs,
the pad id of every jaxlab token set (`Dataset.info['pad_id']`); -1 turns it
off (every position computed and pooled, the behaviour before issue 13).

Parameter paths:

    encoder/embedding [V+1, D]  or  encoder/{kernel [C(+1), D], bias [D]}
    pos_embed [1, max_len, D]                          (transformer only)
    blocks/norm/{scale, bias} [n_layers, D]            (s4d_seq; BatchNorm adds batch_stats)
    blocks/s4d/{log_dt, log_A_real, A_imag, B, C, D, output_linear/...}  (s4d_seq)
    blocks/{norm1, norm2, attn/{query,key,value,out}, fc1, fc2}          (transformer_seq)
    norm/{scale, bias}                                 final norm, only when prenorm
    decoder/{kernel, bias}

Residual block (official `SequenceResidualBlock`): z = norm(x) if prenorm;
z = layer(z); z = dropout(z) (tied over the sequence); x = x + z; x = norm(x)
if not prenorm. `causal=True` gives S4D a causal kernel (and enables step mode)
and the Transformer a causal mask; `causal=False` gives S4D the bidirectional
kernel (unless `bidirectional` is set explicitly).

Step mode (`s4d_seq`, causal, `output='per_position'`): `model.apply(v, x_t,
state=state)` with x_t tokens [B] or values [B, C] returns (out [B, out_dim],
new state); `initial_state(model_cfg, batch)` makes the zero state
[n_layers, B, d_model, d_state/2]. Stepping over L positions equals the
convolutional forward pass (tested).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlab.models import registry
from jaxlab.models.s4d import S4D

COMMON_KEYS = dict(d_model=64, n_layers=2, dropout=0.0, prenorm=True, norm="layer", vocab_size=0,
                   input_channels=1, mask_channel=False, pool="mean", output="classify", out_dim=0,
                   causal=False, pool_pad_id=None)
S4D_KEYS = dict(d_state=64, init="lin", disc="zoh", dt_min=1e-3, dt_max=1e-1, bidirectional=None,
                chunk_size=1024)
TRANSFORMER_KEYS = dict(num_heads=4, mlp_dim=0, max_len=2048, attn_dropout=0.0)


def _norm(kind: str, train: bool, name: str):
  if kind == "layer":
    return nn.LayerNorm(name=name)
  if kind == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
  raise ValueError(f"model.norm: unknown norm {kind!r}; use 'layer' or 'batch'")


def _encode(mod: nn.Module, x, step: bool):
  """Prepares inputs for the encoder (adds the channel axis and the mask channel)."""
  if mod.vocab_size > 0:
    return x
  x = x.astype(jnp.float32)
  if (not step and x.ndim == 2) or (step and x.ndim == 1):
    x = x[..., None]
  c = int(mod.input_channels)
  if mod.mask_channel:
    if x.shape[-1] == c:
      x = jnp.concatenate([x, jnp.zeros(x.shape[:-1] + (1,), x.dtype)], -1)
    elif x.shape[-1] != c + 1:
      raise ValueError(f"model.input_channels={c} with mask_channel: inputs must have {c} or {c + 1} "
                       f"channels, got shape {x.shape}")
  elif x.shape[-1] != c:
    raise ValueError(f"model.input_channels={c}: inputs have {x.shape[-1]} channels (shape {x.shape})")
  return x


def pad_id(mod: nn.Module) -> int:
  """The padding token id the model honours: `pool_pad_id`, None = 0 for token inputs; -1 = none."""
  if mod.vocab_size <= 0:
    return -1
  return 0 if mod.pool_pad_id is None else int(mod.pool_pad_id)


def real_mask(mod: nn.Module, tokens) -> jax.Array | None:
  """float [B, L] ([B] for one step's tokens): 1 at real (non-padding) tokens; None when padding is not honoured."""
  pid = pad_id(mod)
  if pid < 0 or tokens is None:
    return None
  return (tokens != pid).astype(jnp.float32)


def _head(mod: nn.Module, x, num_classes: int, real=None):
  """Pool and classify; with a `real` mask [B, L] 'mean' averages the real positions, 'last' takes the last one."""
  if mod.output == "per_position":
    if not mod.out_dim:
      raise ValueError("model.out_dim: set the per-position output size for output='per_position'")
    return nn.Dense(mod.out_dim, name="decoder")(x).astype(jnp.float32)
  if mod.output != "classify":
    raise ValueError(f"model.output: unknown output {mod.output!r}; use 'classify' or 'per_position'")
  if mod.pool == "mean" and real is not None:
    w = real.astype(x.dtype)[..., None]  # true lengths: padding is never pooled
    x = (x * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0)
  elif mod.pool == "mean":
    x = x.mean(axis=1)
  elif mod.pool == "last" and real is not None:
    last = jnp.maximum(real.sum(axis=1).astype(jnp.int32) - 1, 0)  # right padding: the last real position
    x = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
  elif mod.pool == "last":
    x = x[:, -1]
  else:
    raise ValueError(f"model.pool: unknown pool {mod.pool!r}; use 'mean' or 'last'")
  return nn.Dense(num_classes, name="decoder")(x).astype(jnp.float32)


class S4DBlock(nn.Module):
  """Residual block around an S4D layer; `state` None = convolution mode."""
  prenorm: bool
  norm: str
  dropout: float
  layer_kw: Any

  @nn.compact
  def __call__(self, x, state, real, train: bool):
    norm = _norm(self.norm, train, "norm")
    z = norm(x) if self.prenorm else x
    if real is not None:  # padded positions feed zeros to the convolution: real positions never see padding
      z = z * real[..., None].astype(z.dtype)
    layer = S4D(dropout=self.dropout, name="s4d", **self.layer_kw)
    if state is None:
      z, new_state = layer(z, train), None
    else:
      z, new_state = layer(z, train, state)
    tie = (1,) if z.ndim == 3 else ()
    z = nn.Dropout(self.dropout, broadcast_dims=tie)(z, deterministic=not train)
    x = x + z
    if not self.prenorm:
      x = norm(x)
    return x, new_state


class SeqBackbone(nn.Module):
  """The interface both sequence backbones share (see the module docstring); subclasses add their layer keys."""
  num_classes: int
  d_model: int = 64
  n_layers: int = 2
  dropout: float = 0.0
  prenorm: bool = True
  norm: str = "layer"
  vocab_size: int = 0
  input_channels: int = 1
  mask_channel: bool = False
  pool: str = "mean"
  output: str = "classify"
  out_dim: int = 0
  causal: bool = False
  pool_pad_id: int | None = None  # padding token id (true-length compute and pooling); None = 0 for tokens, -1 off


class S4DSeq(SeqBackbone):
  """S4D sequence backbone (see the module docstring for the keys)."""
  d_state: int = 64
  ssm_init: str = "lin"     # config key `init`
  disc: str = "zoh"
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  bidirectional: bool | None = None
  chunk_size: int = 1024

  @nn.compact
  def __call__(self, x, train: bool = False, state=None):
    bidir = (not self.causal) if self.bidirectional is None else bool(self.bidirectional)
    if self.causal and bidir:
      raise ValueError("model.causal=True conflicts with model.bidirectional=True")
    step = state is not None
    if step and (bidir or self.output != "per_position"):
      raise ValueError("s4d_seq step mode needs model.causal=True and model.output='per_position'")
    tokens, x = x, _encoder(self, _encode(self, x, step))
    layer_kw = dict(d_state=self.d_state, ssm_init=self.ssm_init, disc=self.disc, dt_min=self.dt_min,
                    dt_max=self.dt_max, bidirectional=bidir, chunk_size=self.chunk_size)
    blocks = nn.scan(
        S4DBlock,
        variable_axes={"params": 0, "batch_stats": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0, nn.broadcast, nn.broadcast),
        length=self.n_layers,
    )(self.prenorm, self.norm, self.dropout, layer_kw, name="blocks")
    real = real_mask(self, tokens)  # step mode too: a pad token feeds the layers zeros, as in convolution mode
    x, new_state = blocks(x, state, real, train)
    if self.prenorm:
      x = _norm(self.norm, train, "norm")(x)
    if step:
      return nn.Dense(self.out_dim, name="decoder")(x).astype(jnp.float32), new_state
    return _head(self, x, self.num_classes, real)


def _encoder(mod: nn.Module, x):
  """Encoder created directly in `mod` so its params are `encoder/...`."""
  if mod.vocab_size > 0:
    if jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"model.vocab_size={mod.vocab_size}: expected int tokens, got {x.dtype} inputs; "
                       "set model.vocab_size=0 for continuous inputs")
    return nn.Embed(mod.vocab_size + 1, mod.d_model, name="encoder")(x)
  return nn.Dense(mod.d_model, name="encoder")(x)


class TransformerBlock(nn.Module):
  """Pre- or post-norm Transformer block (bidirectional or causal)."""
  num_heads: int
  mlp_dim: int
  prenorm: bool
  norm: str
  dropout: float
  attn_dropout: float
  causal: bool

  @nn.compact
  def __call__(self, x, real, train: bool):
    d = x.shape[-1]
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32)) if self.causal else None
    if real is not None:  # padded keys are never attended to
      keys = nn.make_attention_mask(jnp.ones(x.shape[:2], jnp.float32), real)
      mask = keys if mask is None else nn.combine_masks(mask, keys)
    n1, n2 = _norm(self.norm, train, "norm1"), _norm(self.norm, train, "norm2")
    z = n1(x) if self.prenorm else x
    z = nn.MultiHeadDotProductAttention(self.num_heads, dropout_rate=self.attn_dropout, name="attn",
                                        deterministic=not train)(z, z, mask=mask)
    x = x + nn.Dropout(self.dropout)(z, deterministic=not train)
    if not self.prenorm:
      x = n1(x)
    z = n2(x) if self.prenorm else x
    z = nn.Dense(self.mlp_dim or 2 * d, name="fc1")(z)
    z = nn.gelu(z, approximate=False)
    z = nn.Dropout(self.dropout)(z, deterministic=not train)
    z = nn.Dense(d, name="fc2")(z)
    x = x + nn.Dropout(self.dropout)(z, deterministic=not train)
    if not self.prenorm:
      x = n2(x)
    return x, None


class TransformerSeq(SeqBackbone):
  """Transformer sequence backbone with the same interface as `S4DSeq`."""
  num_heads: int = 4
  mlp_dim: int = 0
  max_len: int = 2048
  attn_dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    tokens, x = x, _encoder(self, _encode(self, x, False))
    length = x.shape[1]
    if length > self.max_len:
      raise ValueError(f"model.max_len={self.max_len} is shorter than the input length {length}")
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, self.max_len, self.d_model))
    x = nn.Dropout(self.dropout)(x + pos[:, :length], deterministic=not train)
    blocks = nn.scan(
        TransformerBlock,
        variable_axes={"params": 0, "batch_stats": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=self.n_layers,
    )(self.num_heads, self.mlp_dim, self.prenorm, self.norm, self.dropout, self.attn_dropout, self.causal,
      name="blocks")
    real = real_mask(self, tokens)
    x, _ = blocks(x, real, train)
    if self.prenorm:
      x = _norm(self.norm, train, "norm")(x)
    return _head(self, x, self.num_classes, real)


def _kwargs(cfg, allowed: dict, name: str) -> dict:
  kw = {k: v for k, v in dict(cfg).items() if k != "name"}
  unknown = sorted(set(kw) - set(allowed))
  if unknown:
    raise ValueError(f"config.model: unknown keys {unknown} for {name!r}; known: {sorted(allowed)}")
  out = dict(allowed)
  out.update({k: v for k, v in kw.items() if v is not None or allowed[k] is None})
  if out["vocab_size"] < 0:
    raise ValueError(f"model.vocab_size must be >= 0, got {out['vocab_size']}")
  if out["d_model"] <= 0 or out["n_layers"] <= 0:
    raise ValueError(f"model.d_model and model.n_layers must be positive, got {out['d_model']}, {out['n_layers']}")
  return out


@registry.register("s4d_seq")
def build_s4d_seq(cfg, num_classes: int) -> S4DSeq:
  """Builds an `S4DSeq` from the `model` config (keys: COMMON_KEYS and S4D_KEYS)."""
  kw = _kwargs(cfg, {**COMMON_KEYS, **S4D_KEYS}, "s4d_seq")
  kw["ssm_init"] = kw.pop("init")
  return S4DSeq(num_classes=num_classes, **kw)


@registry.register("transformer_seq")
def build_transformer_seq(cfg, num_classes: int) -> TransformerSeq:
  """Builds a `TransformerSeq` from the `model` config (keys: COMMON_KEYS and TRANSFORMER_KEYS)."""
  kw = _kwargs(cfg, {**COMMON_KEYS, **TRANSFORMER_KEYS}, "transformer_seq")
  if kw["d_model"] % kw["num_heads"]:
    raise ValueError(f"model.d_model={kw['d_model']} must be divisible by model.num_heads={kw['num_heads']}")
  return TransformerSeq(num_classes=num_classes, **kw)


def initial_state(model_cfg, batch: int) -> jax.Array:
  """Zero recurrent state [n_layers, B, d_model, d_state/2] (complex64) for `s4d_seq` step mode."""
  kw = _kwargs(model_cfg, {**COMMON_KEYS, **S4D_KEYS}, "s4d_seq")
  return jnp.zeros((kw["n_layers"], batch, kw["d_model"], kw["d_state"] // 2), jnp.complex64)
