"""Position-embedding resampling to another image size, as timm and big_vision do it.

- `bicubic` (timm's default for `.pth` / safetensors checkpoints, `resample_abs_pos_embed`):
  `torch.nn.functional.interpolate(mode='bicubic', antialias=True, align_corners=False)`,
  i.e. separable PIL-style cubic weights (a = -0.5) over a support widened by the
  scale when shrinking, normalised per output position, borders truncated.
- `big_vision` (big_vision's `resample_posemb`): `scipy.ndimage.zoom(order=1)`
  on the grid, corners mapped onto corners.

Prefix tokens (class / distillation token) keep their embeddings unless the
model has `no_embed_class`, where the table holds the grid only.
"""

from __future__ import annotations

import numpy as np

METHODS = ("bicubic", "big_vision")


def _cubic_aa(x: np.ndarray, a: float = -0.5) -> np.ndarray:
  x = np.abs(x)
  return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def bicubic_aa_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's antialiased bicubic interpolation along one axis (align_corners=False)."""
  scale = n_in / n_out
  support = 2.0 * scale if scale >= 1.0 else 2.0
  invscale = 1.0 / scale if scale >= 1.0 else 1.0
  w = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), n_in)
    js = np.arange(lo, hi)
    vals = _cubic_aa((js - center + 0.5) * invscale)
    total = vals.sum()
    w[i, lo:hi] = vals / total if total != 0 else vals
  return w


def resample_grid(grid: np.ndarray, new_hw: tuple[int, int], method: str = "bicubic") -> np.ndarray:
  """Resamples an [H, W, D] grid of embeddings to [H', W', D] (float32)."""
  if method not in METHODS:
    raise ValueError(f"config.resample={method!r}: choose one of {', '.join(METHODS)}")
  h, w, _ = grid.shape
  if (h, w) == tuple(new_hw):
    return grid
  if method == "bicubic":
    wh, ww = bicubic_aa_matrix(h, new_hw[0]), bicubic_aa_matrix(w, new_hw[1])
    out = np.einsum("oh,hwd,pw->opd", wh, grid.astype(np.float64), ww)
    return out.astype(np.float32)
  import scipy.ndimage

  return scipy.ndimage.zoom(grid.astype(np.float32), (new_hw[0] / h, new_hw[1] / w, 1), order=1)


def resample_pos_embed(
  pos_embed: np.ndarray, n_prefix: int, old_grid: tuple[int, int], new_grid: tuple[int, int], method: str = "bicubic"
) -> np.ndarray:
  """[1, n_prefix + H*W, D] -> [1, n_prefix + H'*W', D]; the first `n_prefix` rows are kept as they are."""
  prefix, grid = pos_embed[:, :n_prefix], pos_embed[0, n_prefix:]
  grid = grid.reshape(old_grid[0], old_grid[1], -1)
  new = resample_grid(grid, new_grid, method).reshape(1, -1, grid.shape[-1]).astype(pos_embed.dtype)
  return np.concatenate([prefix, new], axis=1)
