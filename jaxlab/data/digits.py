"""scikit-learn's handwritten digits (1797 real 8x8 images, 10 classes), offline.

The split is fixed and documented: a permutation of all 1797 images with
`np.random.default_rng(0)`, then the first 360 are `test`, the next 180
`validation`, the next 180 `heldout` (for model selection, e.g. greedy soups)
and the remaining 1077 `train`. Pixels (0..16) are scaled to [0, 1] and the
images are [8, 8, 1] float32.

`test_shift` is a distribution-shifted copy of `test` (same 360 images and
labels): each image is rotated by a random angle in [-SHIFT_MAX_DEGREES,
SHIFT_MAX_DEGREES], blurred (Gaussian, sigma SHIFT_BLUR) and given Gaussian
pixel noise (std SHIFT_NOISE), clipped to [0, 1]; deterministic (seed 0).
"""

from __future__ import annotations

import functools

import numpy as np

from jaxlab.data import base

SPLIT_SIZES = {"test": 360, "validation": 180, "heldout": 180}
SHIFT_MAX_DEGREES = 15.0
SHIFT_BLUR = 0.5
SHIFT_NOISE = 0.1


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """All 1797 digits as ([N, 8, 8, 1] float32 in [0, 1], [N] int32 labels)."""
  x, y, _ = _arrays()
  return x.copy(), y.copy()


@functools.lru_cache(maxsize=1)
def _arrays():
  """Read once per process (a pipeline builds the data set for every stage); read-only."""
  from sklearn.datasets import load_digits
  d = load_digits()
  x = (d.images.astype(np.float32) / 16.0)[..., None]
  y = d.target.astype(np.int32)
  test = x[split_indices(len(x))["test"]]
  shifted = shift_images(test)
  for a in (x, y, shifted):
    a.flags.writeable = False
  return x, y, shifted


def split_indices(n: int) -> dict[str, np.ndarray]:
  perm = np.random.default_rng(0).permutation(n)
  out, start = {}, 0
  for name, size in SPLIT_SIZES.items():
    out[name] = perm[start:start + size]
    start += size
  out["train"] = perm[start:]
  return out


def shift_images(x: np.ndarray, seed: int = 0) -> np.ndarray:
  """Distribution shift of [N, 8, 8, 1] images: random rotation, Gaussian blur, pixel noise (deterministic)."""
  from scipy import ndimage
  rng = np.random.default_rng(seed)
  angles = rng.uniform(-SHIFT_MAX_DEGREES, SHIFT_MAX_DEGREES, size=len(x))
  out = np.stack([ndimage.gaussian_filter(ndimage.rotate(img[..., 0], a, reshape=False, order=1, mode="constant"),
                                          SHIFT_BLUR) for img, a in zip(x, angles, strict=True)])[..., None]
  out = out + SHIFT_NOISE * rng.standard_normal(out.shape)
  return np.clip(out, 0.0, 1.0).astype(np.float32)


@base.register("digits")
def build(cfg) -> base.Dataset:
  x, y, shifted = _arrays()
  splits = {k: base.ArraySource({"inputs": x[i], "label": y[i]}) for k, i in split_indices(len(x)).items()}
  splits["test_shift"] = base.ArraySource({"inputs": shifted.copy(), "label": splits["test"].arrays["label"].copy()})
  aug = base.image_augment(shift=cfg.get("aug_shift", 0), noise=cfg.get("aug_noise", 0.0))
  return base.Dataset(name="digits", num_classes=10, splits=splits, input_shape=(8, 8, 1),
                      augment=aug, info={"split_sizes": {k: len(v) for k, v in splits.items()}})
