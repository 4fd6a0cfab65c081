"""Batch augmentations that run on the devices: Mixup, CutMix and random erasing.

They follow timm's definitions (`timm.data.Mixup` in its default 'batch' mode and
`timm.data.RandomErasing` in 'pixel' mode), the ones the DeiT recipe uses:

- Mixup (Zhang et al. 2018): `lam ~ Beta(mixup, mixup)`, `x = lam x + (1 - lam) x[::-1]`.
- CutMix (Yun et al. 2019): `lam ~ Beta(cutmix, cutmix)`; a box of area `(1 - lam) H W`, centred at a
  uniform pixel and clipped to the image, is pasted from `x[::-1]`; `lam` is then corrected to the
  pasted area actually kept (timm's `correct_lam`).
- With both on, one of them is chosen per batch (CutMix with probability `mix_switch_prob`), and a batch
  is mixed at all with probability `mix_prob`. The partner of example `i` is example `B - 1 - i` of the
  global batch (timm's flip), so targets are `lam onehot(y) + (1 - lam) onehot(y[::-1])`, stored as
  `batch['soft_label']` [B, K]; `batch['label']` keeps the original labels (train accuracy).
- Random erasing (Zhong et al. 2020), per example with probability `random_erase`: a box of area
  `U(0.02, 1/3) H W` and aspect ratio log-uniform in `[0.3, 1/0.3]` is filled with N(0, 1) noise in the
  normalised image. Where timm retries a box that does not fit (up to 10 times), the box here is
  clipped to the image instead.

Everything is a pure function of the batch and a key, jitted with the rest of the device stage.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MixConfig:
  """Device-side augmentation settings (the `data.mixup`, `data.cutmix`, ... config keys)."""

  mixup: float = 0.0  # Beta alpha of Mixup (0 = off)
  cutmix: float = 0.0  # Beta alpha of CutMix (0 = off)
  mix_prob: float = 1.0  # probability that a batch is mixed at all
  mix_switch_prob: float = 0.5  # with both on: probability of CutMix rather than Mixup
  random_erase: float = 0.0  # per-example probability of random erasing

  @property
  def active(self) -> bool:
    return bool(self.mixup > 0 or self.cutmix > 0 or self.random_erase > 0)

  @classmethod
  def from_settings(cls, settings: dict) -> MixConfig:
    """From resolved settings (`jaxlab.data.images.resolve`: explicit keys > checkpoint > preset > off)."""
    out = cls(
      mixup=float(settings["mixup"]),
      cutmix=float(settings["cutmix"]),
      mix_prob=float(settings["mix_prob"]),
      mix_switch_prob=float(settings["mix_switch_prob"]),
      random_erase=float(settings["random_erase"]),
    )
    for name in ("mix_prob", "mix_switch_prob", "random_erase"):
      if not 0.0 <= getattr(out, name) <= 1.0:
        raise ValueError(f"config.data.{name}={getattr(out, name)}: a probability must be in [0, 1]")
    return out


def cutmix_box(key, lam, height: int, width: int):
  """timm's `rand_bbox`: (y0, y1, x0, x1) of a box of area about `(1 - lam) H W` centred at a uniform pixel."""
  cut = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (height * cut).astype(jnp.int32), (width * cut).astype(jnp.int32)
  ky, kx = jax.random.split(key)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  return y0, y1, x0, x1


def mix_batch(batch: dict, key, cfg: MixConfig, num_classes: int) -> dict:
  """Mixup or CutMix of a [B, H, W, C] batch with its reversal; adds `soft_label` [B, K] (rows sum to one)."""
  x, y = batch["inputs"], batch["label"]
  k_do, k_switch, k_lam_m, k_lam_c, k_box = jax.random.split(key, 5)
  onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)
  if cfg.mixup <= 0 and cfg.cutmix <= 0:
    return {**batch, "soft_label": onehot}
  do_mix = jax.random.uniform(k_do) < cfg.mix_prob
  if cfg.mixup > 0 and cfg.cutmix > 0:
    use_cutmix = jax.random.uniform(k_switch) < cfg.mix_switch_prob
  else:
    use_cutmix = jnp.asarray(cfg.cutmix > 0)
  lam_m = jax.random.beta(k_lam_m, cfg.mixup, cfg.mixup) if cfg.mixup > 0 else jnp.float32(1.0)
  lam_c = jax.random.beta(k_lam_c, cfg.cutmix, cfg.cutmix) if cfg.cutmix > 0 else jnp.float32(1.0)
  partner = x[::-1]
  h, w = x.shape[1], x.shape[2]
  y0, y1, x0, x1 = cutmix_box(k_box, lam_c, h, w)
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  box = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[None, :, :, None]
  lam_c_kept = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)
  x_cut = jnp.where(box, partner, x)
  x_mix = (lam_m * x.astype(jnp.float32) + (1.0 - lam_m) * partner.astype(jnp.float32)).astype(x.dtype)
  lam = jnp.where(do_mix, jnp.where(use_cutmix, lam_c_kept, lam_m), 1.0)
  x_out = jnp.where(do_mix, jnp.where(use_cutmix, x_cut, x_mix), x)
  soft = lam * onehot + (1.0 - lam) * onehot[::-1]
  return {**batch, "inputs": x_out, "soft_label": soft}


def random_erase(x, key, prob: float):
  """timm-style random erasing ('pixel' mode) of each image of [B, H, W, C] with probability `prob`."""
  b, h, w, _ = x.shape
  k_do, k_area, k_ratio, k_y, k_x, k_fill = jax.random.split(key, 6)
  do = jax.random.uniform(k_do, (b,)) < prob
  area = jax.random.uniform(k_area, (b,), minval=0.02, maxval=1 / 3) * h * w
  ratio = jnp.exp(jax.random.uniform(k_ratio, (b,), minval=math.log(0.3), maxval=math.log(1 / 0.3)))
  eh = jnp.clip(jnp.round(jnp.sqrt(area * ratio)), 1, h).astype(jnp.int32)
  ew = jnp.clip(jnp.round(jnp.sqrt(area / ratio)), 1, w).astype(jnp.int32)
  top = jnp.floor(jax.random.uniform(k_y, (b,)) * (h - eh + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_x, (b,)) * (w - ew + 1)).astype(jnp.int32)
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  inside = (
    (rows >= top[:, None, None])
    & (rows < (top + eh)[:, None, None])
    & (cols >= left[:, None, None])
    & (cols < (left + ew)[:, None, None])
    & do[:, None, None]
  )
  noise = jax.random.normal(k_fill, x.shape, jnp.float32).astype(x.dtype)
  return jnp.where(inside[..., None], noise, x)


def apply(batch: dict, key, cfg: MixConfig, num_classes: int) -> dict:
  """Random erasing, then Mixup/CutMix (timm's order: erasing is per-example, mixing per batch)."""
  k_erase, k_mix = jax.random.split(key)
  if cfg.random_erase > 0:
    batch = {**batch, "inputs": random_erase(batch["inputs"], k_erase, cfg.random_erase)}
  if cfg.mixup > 0 or cfg.cutmix > 0:
    batch = mix_batch(batch, k_mix, cfg, num_classes)
  return batch
