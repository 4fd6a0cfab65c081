"""A pre-activation Wide ResNet (WRN-d-k) in Flax Linen, as the official CIFAR model.

Structure (Zagoruyko & Komodakis; the MixtureGrowth repo's `normal_wrn.py`):
stem 3x3 conv -> 3 stages of `(depth - 4) // 6` blocks (strides 1, 2, 2) ->
BN -> ReLU -> global average pool -> Dense. A block is
`BN -> ReLU -> conv3x3 (stride) -> [BN] -> ReLU -> conv3x3`; when the width or
stride changes, the shortcut is a 1x1 conv of the *pre-activated* input. The
BN between the two convs is off by default (`mid_bn=False`), as in the
official scripts. Convs have no bias.

Parameter paths (`s` = stage 1..3, `b` = block index):

    stem/kernel                          [3, 3, C_in, stem_width]
    stage{s}_block{b}/bn1/{scale,bias}   [C_block_in]
    stage{s}_block{b}/conv1/kernel       [3, 3, C_block_in, C_s]
    stage{s}_block{b}/bn2/{scale,bias}   [C_s]            (only with mid_bn)
    stage{s}_block{b}/conv2/kernel       [3, 3, C_s, C_s]
    stage{s}_block{b}/shortcut/kernel    [1, 1, C_block_in, C_s]   (first block when shapes change)
    norm/{scale,bias}                    [C_3]
    head/kernel [C_3, K], head/bias [K]  (bias only with head_bias)

with `C_s = round(16 * 2**(s-1) * widen_factor)`. BatchNorm running statistics
live in the `batch_stats` collection (same paths, `mean`/`var`), which the
training loop treats as `model_state`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxlab.models import registry

# torch's kaiming_normal_ (fan_in, ReLU gain) as used by the official WRN: std = sqrt(2 / fan_in).
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def stage_widths(stem_width: int, widen_factor: float) -> tuple[int, int, int, int]:
  """Channel widths `(stem, stage1, stage2, stage3)` of a WRN.

  Raises:
    ValueError: when a stage width is not a whole number of channels.
  """
  widths = []
  for base in (16, 32, 64):
    w = base * float(widen_factor)
    if abs(w - round(w)) > 1e-9 or w < 1:
      raise ValueError(f"config.model.widen_factor={widen_factor}: stage width {base}*{widen_factor} is not a "
                       "positive whole number of channels")
    widths.append(int(round(w)))
  return (int(stem_width), *widths)


def _bn(name: str, train: bool) -> nn.BatchNorm:
  # torch BatchNorm2d defaults: momentum 0.1 (flax: 0.9), eps 1e-5.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class WideBlock(nn.Module):
  """Pre-activation basic block: BN-ReLU-conv-[BN]-ReLU-conv plus (projected) shortcut."""
  out_channels: int
  stride: int = 1
  mid_bn: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    equal = x.shape[-1] == self.out_channels and self.stride == 1
    out = nn.relu(_bn("bn1", train)(x))
    residual = x if equal else out
    y = nn.Conv(self.out_channels, (3, 3), strides=(self.stride,) * 2, padding=((1, 1), (1, 1)), use_bias=False,
                kernel_init=kaiming_normal, name="conv1")(out)
    if self.mid_bn:
      y = _bn("bn2", train)(y)
    y = nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, kernel_init=kaiming_normal,
                name="conv2")(nn.relu(y))
    if not equal:
      residual = nn.Conv(self.out_channels, (1, 1), strides=(self.stride,) * 2, padding="VALID", use_bias=False,
                         kernel_init=kaiming_normal, name="shortcut")(residual)
    return y + residual


class WRN(nn.Module):
  """Pre-activation Wide ResNet for images [B, H, W, C].

  Attributes:
    num_classes: classifier outputs.
    depth: total depth `6n + 4` (n blocks per stage).
    widen_factor: stage widths are 16k, 32k, 64k.
    stem_width: output channels of the stem conv (16 in the paper; 8 for a half-width member).
    mid_bn: BatchNorm between the two convs of a block (off in the official scripts).
    head_bias: bias on the classifier (the official template model has none).
  """
  num_classes: int
  depth: int = 10
  widen_factor: float = 2.0
  stem_width: int = 16
  mid_bn: bool = False
  head_bias: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 4) % 6 or self.depth < 10:
      raise ValueError(f"config.model.depth={self.depth}: a WRN needs depth = 6n + 4 with n >= 1")
    if x.ndim == 3:
      x = x[..., None]
    n = (self.depth - 4) // 6
    stem, *widths = stage_widths(self.stem_width, self.widen_factor)
    x = nn.Conv(stem, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, kernel_init=kaiming_normal,
                name="stem")(x.astype(jnp.float32))
    for s, (width, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
      for b in range(n):
        x = WideBlock(width, stride if b == 0 else 1, self.mid_bn, name=f"stage{s}_block{b}")(x, train)
    x = nn.relu(_bn("norm", train)(x))
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, use_bias=self.head_bias, kernel_init=kaiming_normal,
                    bias_init=nn.initializers.zeros, name="head")(x)


def forward_macs(model_cfg: dict, num_classes: int, input_shape: tuple[int, ...]) -> int:
  """Multiply-accumulates of one forward pass of one example, counted analytically.

  Counts every conv (`H_out * W_out * k * k * C_in * C_out`) and the classifier
  (`C * K`); BatchNorm, ReLU, pooling and residual additions are ignored
  (under 1% here). Training FLOPs per example are taken as `3 * 2 * MACs`
  (forward + backward, one multiply-add = 2 FLOPs).
  """
  depth = int(model_cfg.get("depth", 10))
  stem, *widths = stage_widths(int(model_cfg.get("stem_width", 16)), float(model_cfg.get("widen_factor", 2.0)))
  h, w = input_shape[0], input_shape[1]
  c_in = input_shape[2] if len(input_shape) > 2 else 1
  macs = h * w * 9 * c_in * stem
  c = stem
  n = (depth - 4) // 6
  for width, stride in zip(widths, (1, 2, 2)):
    for b in range(n):
      st = stride if b == 0 else 1
      ho, wo = -(-h // st), -(-w // st)
      macs += ho * wo * 9 * c * width + ho * wo * 9 * width * width
      if c != width or st != 1:
        macs += ho * wo * c * width
      h, w, c = ho, wo, width
  macs += c * num_classes
  return int(macs)


@registry.register("wrn")
def build_wrn(cfg, num_classes: int) -> WRN:
  """Builds a WRN from `model` config keys: depth, widen_factor, stem_width, mid_bn, head_bias."""
  kw = {k: v for k, v in dict(cfg).items() if k != "name" and v is not None}
  known = {"depth", "widen_factor", "stem_width", "mid_bn", "head_bias"}
  unknown = sorted(set(kw) - known)
  if unknown:
    raise ValueError(f"config.model: unknown WRN key(s) {unknown}; known: {sorted(known)}")
  return WRN(num_classes=num_classes, **kw)

