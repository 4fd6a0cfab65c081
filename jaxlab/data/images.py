"""Image preprocessing for real image sets: decode, resize, crops, flips, RandAugment; uint8 until the device.

Settings (`ImageSettings`) come from three places, first one wins per key:
1. `config.data.*` keys set explicitly (image_size > 0, mean/std non-empty, interpolation/preset non-empty,
   numbers >= 0 where -1 means "unset");
2. the `preprocessing` dict of a checkpoint's meta (written by the importers of timm/PyTorch checkpoints:
   `{"image_size": [H, W], "mean": [...], "std": [...], "interpolation": "bicubic", "crop_pct": 0.875}`), taken
   from `config.init_from.path` when training and from the evaluated checkpoint when evaluating;
3. the preset (`data.preset = 'deit' | 'cifar'`), then the plain defaults (no augmentation, ImageNet
   mean/std, bilinear, crop_pct 0.875).

Per-example ops use PIL (Pillow), a well-kept library whose resampling filters are the ones timm and
torchvision use on PIL images, so resizing matches their eval numbers. Train: timm's
`RandomResizedCropAndInterpolation` sampling (scale, log-uniform ratio, 10 attempts, then a center crop
of clamped ratio) or the CIFAR pad-and-crop, a horizontal flip, RandAugment
(`jaxlab.data.randaugment`). Eval: resize the shorter side to `image_size / crop_pct`, center crop.
Outputs stay uint8 [S, S, C]; normalisation runs on the device (`Dataset.device_preprocess`).
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image

from jaxlab.data import randaugment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
INTERPOLATIONS = {
  "nearest": Image.NEAREST,
  "bilinear": Image.BILINEAR,
  "bicubic": Image.BICUBIC,
  "lanczos": Image.LANCZOS,
  "box": Image.BOX,
  "hamming": Image.HAMMING,
}

# Recipes: DeiT (Touvron et al. 2021, the timm `create_transform` + Mixup settings of its main.py) and the
# CIFAR WRN recipe (Zagoruyko & Komodakis 2016: 4-pixel pad-and-crop, flips, per-channel normalisation).
PRESETS = {
  "deit": dict(
    image_size=224,
    crop="random_resized",
    rrc_scale=(0.08, 1.0),
    rrc_ratio=(3 / 4, 4 / 3),
    flip=1,
    randaugment="rand-m9-mstd0.5-inc1",
    random_erase=0.25,
    mixup=0.8,
    cutmix=1.0,
    mix_prob=1.0,
    mix_switch_prob=0.5,
    interpolation="bicubic",
    crop_pct=0.875,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
  ),
  "cifar": dict(
    image_size=32,
    crop="pad",
    crop_padding=4,
    flip=1,
    randaugment="",
    random_erase=0.0,
    mixup=0.0,
    cutmix=0.0,
    interpolation="bilinear",
    crop_pct=1.0,
    mean=CIFAR_MEAN,
    std=CIFAR_STD,
  ),
}
DEFAULTS = dict(
  image_size=0,
  crop="random_resized",
  rrc_scale=(0.08, 1.0),
  rrc_ratio=(3 / 4, 4 / 3),
  crop_padding=4,
  flip=0,
  randaugment="",
  random_erase=0.0,
  mixup=0.0,
  cutmix=0.0,
  mix_prob=1.0,
  mix_switch_prob=0.5,
  interpolation="bilinear",
  crop_pct=0.875,
  mean=IMAGENET_MEAN,
  std=IMAGENET_STD,
  channels=0,
)


def _is_set(key: str, value) -> bool:
  if value is None:
    return False
  if isinstance(value, str | tuple | list):
    return len(value) > 0
  if key == "image_size":
    return int(value) > 0
  return float(value) >= 0  # numeric keys use -1 for "unset"


def resolve(data_cfg, checkpoint_meta: dict | None = None) -> dict:
  """The effective image settings: explicit `data.*` keys > checkpoint `preprocessing` > preset > defaults.

  Raises:
    ValueError: for an unknown preset or interpolation, or mean/std of the wrong length.
  """
  preset = data_cfg.get("preset", "") or ""
  if preset and preset not in PRESETS:
    raise ValueError(f"config.data.preset: unknown preset {preset!r}; known: {sorted(PRESETS)}")
  out = {**DEFAULTS, **PRESETS.get(preset, {})}
  meta = checkpoint_meta or {}
  # an imported checkpoint's meta['preprocessing'], or what a jaxlab run recorded in meta['data']['preprocessing']
  pre = meta.get("preprocessing") or (meta.get("data") or {}).get("preprocessing") or {}
  pre = {k: pre[k] for k in ("image_size", "mean", "std", "interpolation", "crop_pct") if pre.get(k) is not None}
  if pre:
    size = pre.get("image_size")
    if size is not None:
      out["image_size"] = int(size[0] if isinstance(size, list | tuple) else size)
    for k in ("mean", "std", "interpolation", "crop_pct"):
      if pre.get(k) is not None:
        out[k] = tuple(pre[k]) if isinstance(pre[k], list) else pre[k]
  for k in DEFAULTS:
    v = data_cfg.get(k, None)
    if _is_set(k, v):
      out[k] = tuple(v) if isinstance(v, list) else v
  if out["interpolation"] not in INTERPOLATIONS:
    raise ValueError(f"config.data.interpolation: unknown {out['interpolation']!r}; known: {sorted(INTERPOLATIONS)}")
  if out["crop"] not in ("random_resized", "pad"):
    raise ValueError(f"config.data.crop: unknown {out['crop']!r}; use 'random_resized' or 'pad'")
  if not 0 < float(out["crop_pct"]) <= 1:
    raise ValueError(f"config.data.crop_pct={out['crop_pct']}: must be in (0, 1]")
  if out["randaugment"]:
    randaugment.parse(out["randaugment"])  # validates the spec
  out["preset"] = preset
  out["from_checkpoint"] = sorted(pre)
  return out


def per_channel(values, channels: int, key: str) -> tuple[float, ...]:
  """`values` for `channels` channels: one value is repeated, three values for one channel are averaged."""
  values = tuple(float(v) for v in values)
  if len(values) == channels:
    return values
  if len(values) == 1:
    return values * channels
  if channels == 1:
    return (sum(values) / len(values),)
  raise ValueError(f"config.data.{key}: {len(values)} values for images of {channels} channels")


def to_array(image) -> np.ndarray:
  """A decoded image as uint8 [H, W, C]: encoded bytes (JPEG/PNG) are decoded with PIL, [H, W] gets C = 1."""
  if isinstance(image, bytes | bytearray | np.bytes_):
    with Image.open(io.BytesIO(bytes(image))) as im:
      im = im.convert("RGB") if im.mode not in ("L", "RGB") else im
      image = np.asarray(im)
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = np.clip(image, 0, 255).astype(np.uint8)
  return image[..., None] if image.ndim == 2 else image


def _to_pil(x: np.ndarray) -> Image.Image:
  return Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x)


def _channels(x: np.ndarray, channels: int) -> np.ndarray:
  if not channels or x.shape[-1] == channels:
    return x
  if x.shape[-1] == 1 and channels == 3:
    return np.repeat(x, 3, axis=-1)
  if x.shape[-1] == 3 and channels == 1:
    return np.asarray(Image.fromarray(x).convert("L"))[..., None]
  if x.shape[-1] == 4 and channels == 3:
    return x[..., :3]
  raise ValueError(f"config.data.channels={channels}: cannot convert an image with {x.shape[-1]} channels")


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int, scale, ratio) -> tuple[int, ...]:
  """timm's RandomResizedCrop parameters: (top, left, h, w) of a crop of area fraction in `scale` and
  aspect ratio log-uniform in `ratio`; after 10 misses, a center crop with the ratio clamped to `ratio`."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(img: Image.Image, box: tuple[int, int, int, int], size: int, interp) -> Image.Image:
  """Crop `box` = (top, left, h, w), then resize to `size`^2: torchvision's `resized_crop` on PIL images
  (PIL's `resize(box=...)` would filter across the box edge and differ near it)."""
  top, left, h, w = box
  return img.crop((left, top, left + w, top + h)).resize((size, size), interp)


def eval_resize_crop(x: np.ndarray, size: int, crop_pct: float, interpolation: str) -> np.ndarray:
  """Resize the shorter side to `floor(size / crop_pct)` (timm's eval rule; the longer side truncated as
  torchvision's `Resize(int)` does), then center crop `size`^2 (offsets rounded, as its `CenterCrop`)."""
  h, w = x.shape[:2]
  scale_size = math.floor(size / crop_pct)
  if (h, w) == (size, size) and scale_size == size:
    return x
  if h <= w:
    nh, nw = scale_size, max(scale_size, int(w * scale_size / h))
  else:
    nh, nw = max(scale_size, int(h * scale_size / w)), scale_size
  img = _to_pil(x).resize((nw, nh), INTERPOLATIONS[interpolation])
  top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
  out = np.asarray(img.crop((left, top, left + size, top + size)))
  return out[..., None] if out.ndim == 2 else out


class TrainTransform:
  """Per-example training preprocessing: uint8 [S, S, C] from an image of any size (picklable)."""

  def __init__(self, settings: dict, image_key: str = "image", label_key: str = "label"):
    self.s = dict(settings)
    self.image_key, self.label_key = image_key, label_key
    self.ra = None
    if self.s["randaugment"]:  # as timm's create_transform: the pipeline's filter and mean for the geometric ops
      fill = tuple(min(255, round(255 * v)) for v in per_channel(self.s["mean"], 3, "mean"))
      self.ra = dataclasses.replace(
        randaugment.parse(self.s["randaugment"]), fill=fill, resample=INTERPOLATIONS[self.s["interpolation"]]
      )

  def image(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    s = self.s
    x = _channels(to_array(x), int(s["channels"]))
    size = int(s["image_size"]) or x.shape[0]
    interp = INTERPOLATIONS[s["interpolation"]]
    if s["crop"] == "pad":
      if x.shape[:2] != (size, size):
        x = eval_resize_crop(x, size, 1.0, s["interpolation"])
      p = int(s["crop_padding"])
      padded = np.pad(x, ((p, p), (p, p), (0, 0)))
      dy, dx = rng.integers(0, 2 * p + 1, size=2)
      img = _to_pil(padded[dy : dy + size, dx : dx + size])
    else:
      top, left, h, w = random_resized_crop_box(rng, x.shape[0], x.shape[1], s["rrc_scale"], s["rrc_ratio"])
      img = resized_crop(_to_pil(x), (top, left, h, w), size, interp)
    if float(s["flip"]) > 0 and rng.random() < 0.5:
      img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if self.ra is not None:
      img = randaugment.apply(img, self.ra, rng)
    out = np.asarray(img, np.uint8)
    return out[..., None] if out.ndim == 2 else out

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    return {"inputs": self.image(example[self.image_key], rng), "label": np.asarray(example[self.label_key], np.int32)}


class EvalTransform:
  """Per-example eval preprocessing: resize and center crop, uint8 [S, S, C] (deterministic, picklable)."""

  def __init__(self, settings: dict, image_key: str = "image", label_key: str = "label"):
    self.s = dict(settings)
    self.image_key, self.label_key = image_key, label_key

  def image(self, x) -> np.ndarray:
    x = _channels(to_array(x), int(self.s["channels"]))
    size = int(self.s["image_size"]) or x.shape[0]
    return eval_resize_crop(x, size, float(self.s["crop_pct"]), self.s["interpolation"])

  def __call__(self, example: dict) -> dict:
    return {"inputs": self.image(example[self.image_key]), "label": np.asarray(example[self.label_key], np.int32)}
