"""RandAugment (Cubuk et al. 2020) with timm's spec strings and magnitudes, on PIL images.

The DeiT recipe names its augmentation with timm's string `rand-m9-mstd0.5-inc1`: `n` (default 2) ops per
image, each drawn uniformly from the op list and applied with probability 0.5 (timm's RandAugment), at
magnitude `m` (of 10) plus Gaussian noise of std `mstd` per application, clipped to [0, 10]; `inc1` selects
the "increasing" op variants whose strength grows with the magnitude. The image operations themselves are
Pillow's (`ImageOps`, `ImageEnhance`, `Image.transform`/`rotate`); this module holds only the policy (the op
list and how a magnitude maps to each op's argument, as in timm's `auto_augment.py`). Random draws come
from a numpy Generator, so they follow the pipeline's `(seed, step, position)` rule.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0
FILL = (124, 116, 104)  # timm's fill colour for geometric ops: the ImageNet mean in uint8
TRANSLATE_PCT = 0.45

# timm's _RAND_INCREASING_TRANSFORMS and _RAND_TRANSFORMS
INCREASING_OPS = (
  "AutoContrast",
  "Equalize",
  "Invert",
  "Rotate",
  "PosterizeIncreasing",
  "SolarizeIncreasing",
  "SolarizeAdd",
  "ColorIncreasing",
  "ContrastIncreasing",
  "BrightnessIncreasing",
  "SharpnessIncreasing",
  "ShearX",
  "ShearY",
  "TranslateXRel",
  "TranslateYRel",
)
DEFAULT_OPS = (
  "AutoContrast",
  "Equalize",
  "Invert",
  "Rotate",
  "Posterize",
  "Solarize",
  "SolarizeAdd",
  "Color",
  "Contrast",
  "Brightness",
  "Sharpness",
  "ShearX",
  "ShearY",
  "TranslateXRel",
  "TranslateYRel",
)


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
  num_ops: int = 2
  magnitude: float = 9.0
  magnitude_std: float = 0.0
  ops: tuple[str, ...] = DEFAULT_OPS
  prob: float = 0.5
  resample: int | None = None  # PIL filter of geometric ops; None = bilinear or bicubic at random (timm's default)
  fill: tuple[int, int, int] = FILL  # colour of uncovered pixels (timm: the normalisation mean in uint8)


def parse(spec: str) -> RandAugmentSpec:
  """Parses timm's `rand-m9-n2-mstd0.5-inc1` form.

  Raises:
    ValueError: for a string that is not of that form (naming config.data.randaugment).
  """
  parts = spec.split("-")
  if parts[0] != "rand":
    raise ValueError(f"config.data.randaugment={spec!r}: expected timm's form 'rand-m9-mstd0.5-inc1'")
  kw: dict = {}
  for p in parts[1:]:
    try:
      if p.startswith("mstd"):
        kw["magnitude_std"] = float(p[4:])
      elif p.startswith("inc"):
        if int(p[3:]):
          kw["ops"] = INCREASING_OPS
      elif p.startswith("m"):
        kw["magnitude"] = float(p[1:])
      elif p.startswith("n"):
        kw["num_ops"] = int(p[1:])
      elif p.startswith("p"):
        kw["prob"] = float(p[1:])
      else:
        raise ValueError(p)
    except ValueError as e:
      raise ValueError(
        f"config.data.randaugment={spec!r}: cannot read {p!r} (use m<int>, n<int>, mstd<float>, inc<0|1>, p<float>)"
      ) from e
  return RandAugmentSpec(**kw)


def _signed(v: float, rng) -> float:
  return -v if rng.random() < 0.5 else v


def _resample(rng, spec):
  if spec.resample is not None:  # timm: create_transform passes the pipeline's interpolation to the ops
    return spec.resample
  return Image.BILINEAR if rng.random() < 0.5 else Image.BICUBIC  # timm's default picks one at random


def _affine(img, matrix, rng, spec):
  return img.transform(img.size, Image.AFFINE, matrix, resample=_resample(rng, spec), fillcolor=_fill(img, spec))


def _fill(img, spec):
  return tuple(spec.fill) if img.mode == "RGB" else spec.fill[0]


def _solarize_add(img, add: int, thresh: int = 128):
  lut = [min(255, i + add) if i < thresh else i for i in range(256)]
  return img.point(lut * (3 if img.mode == "RGB" else 1))


def _posterize(img, bits: int):
  """Keep the `bits` high bits of each channel (0..8; Pillow's own posterize refuses 0, which timm's levels reach)."""
  if bits >= 8:
    return img
  mask = ~(2 ** (8 - bits) - 1) & 0xFF
  return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _op(name: str, img: Image.Image, level: float, rng, spec: RandAugmentSpec | None = None) -> Image.Image:
  spec = spec or RandAugmentSpec()
  f = level / MAX_LEVEL
  w, h = img.size
  if name == "AutoContrast":
    return ImageOps.autocontrast(img)
  if name == "Equalize":
    return ImageOps.equalize(img)
  if name == "Invert":
    return ImageOps.invert(img)
  if name == "Rotate":
    angle = _signed(f * 30.0, rng)
    return img.rotate(angle, resample=_resample(rng, spec), fillcolor=_fill(img, spec))
  if name == "Posterize":
    return _posterize(img, int(f * 4))
  if name == "PosterizeIncreasing":
    return _posterize(img, 4 - int(f * 4))
  if name == "Solarize":
    return ImageOps.solarize(img, int(f * 256))
  if name == "SolarizeIncreasing":
    return ImageOps.solarize(img, 256 - int(f * 256))
  if name == "SolarizeAdd":
    return _solarize_add(img, int(f * 110))
  enhancers = {
    "Color": ImageEnhance.Color,
    "Contrast": ImageEnhance.Contrast,
    "Brightness": ImageEnhance.Brightness,
    "Sharpness": ImageEnhance.Sharpness,
  }
  if name in enhancers:
    return enhancers[name](img).enhance(f * 1.8 + 0.1)
  if name.endswith("Increasing") and name[: -len("Increasing")] in enhancers:
    return enhancers[name[: -len("Increasing")]](img).enhance(max(0.1, 1.0 + _signed(f * 0.9, rng)))
  if name == "ShearX":
    return _affine(img, (1, _signed(f * 0.3, rng), 0, 0, 1, 0), rng, spec)
  if name == "ShearY":
    return _affine(img, (1, 0, 0, _signed(f * 0.3, rng), 1, 0), rng, spec)
  if name == "TranslateXRel":
    return _affine(img, (1, 0, _signed(f * TRANSLATE_PCT, rng) * w, 0, 1, 0), rng, spec)
  if name == "TranslateYRel":
    return _affine(img, (1, 0, 0, 0, 1, _signed(f * TRANSLATE_PCT, rng) * h), rng, spec)
  raise ValueError(f"randaugment: unknown op {name!r}")


def apply(img: Image.Image, spec: RandAugmentSpec, rng: np.random.Generator) -> Image.Image:
  """`spec.num_ops` ops drawn with replacement, each applied with probability `spec.prob`."""
  for name in rng.choice(spec.ops, size=spec.num_ops, replace=True):
    if rng.random() >= spec.prob:
      continue
    level = spec.magnitude
    if spec.magnitude_std > 0:
      level = float(np.clip(rng.normal(level, spec.magnitude_std), 0.0, MAX_LEVEL))
    img = _op(str(name), img, level, rng, spec)
  return img
