"""The data layer: a registry of named data sets, each a set of random-access splits.

Every data set, built in (digits, generated sequence tasks) or from tfds, is a
`Dataset` whose splits are random-access sources (`len`, `source[int]` -> dict
of numpy arrays). Batches are read by index, which makes training exactly
resumable: the batch of step `s` depends only on `(seed, s)`.

Batch dicts hold `inputs` and `label`, and eval batches also `mask` (1 for
real examples, 0 for padding) so metrics are exact over the whole split.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from jaxlab.registry import Registry

# Builders `fn(data_cfg[, checkpoint_meta=...]) -> Dataset`; every module of jaxlab.data may register one.
DATASETS = Registry("data set", key="config.data.name", package="jaxlab.data")


def register(name: str):
  """Decorator registering a data set builder `fn(data_cfg) -> Dataset` under `name`."""
  return DATASETS.register(name)


def names() -> list[str]:
  return DATASETS.names()


class ArraySource:
  """Random-access source over in-memory arrays with a shared leading axis."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    self.arrays = dict(arrays)
    sizes = {len(v) for v in self.arrays.values()}
    if len(sizes) != 1:
      raise ValueError(f"arrays of different lengths: { {k: len(v) for k, v in self.arrays.items()} }")
    self._n = sizes.pop()

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i):
    return {k: v[i] for k, v in self.arrays.items()}

  def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[indices] for k, v in self.arrays.items()}


def _take(source, indices: np.ndarray) -> dict[str, np.ndarray]:
  if hasattr(source, "take"):
    return source.take(indices)
  rows = [source[int(i)] for i in indices]
  return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}


@dataclasses.dataclass
class Dataset:
  """A named data set.

  Attributes:
    name: registry name.
    num_classes: number of classes (or vocabulary size for token targets).
    splits: `{split_name: source}`; the training split is `train`.
    input_shape: shape of one example's `inputs` (for model initialisation).
    input_dtype: dtype of `inputs`.
    augment: optional `fn(batch, rng) -> batch` applied to training batches (host, whole batch).
    info: extra JSON-able facts recorded in checkpoint meta.
    train_transform: optional `fn(example, rng) -> example` applied to each training example before
      batching (decode, random-resized-crop, RandAugment...). Its rng depends only on `(seed, step,
      position in the global batch)`, so a batch is the same whatever the process count.
    eval_transform: optional deterministic `fn(example) -> example` for eval examples (resize, center crop).
    normalize: `(mean, std)` per channel for uint8 `inputs`, applied on the device (`device_preprocess`):
      images stay uint8 through the host pipeline and the host-to-device copy.
    eval_threads: grain read threads preparing eval batches of sets with an `eval_transform`.
    repeated_aug: repeated augmentation (Hoffer et al. 2020; DeiT): each sampled image appears this many
      times per epoch, differently augmented (1 = off; `data.repeated_aug`).
  """
  name: str
  num_classes: int
  splits: dict[str, Any]
  input_shape: tuple[int, ...]
  input_dtype: Any = np.float32
  augment: Callable[[dict, np.random.Generator], dict] | None = None
  info: dict = dataclasses.field(default_factory=dict)
  train_transform: Callable[[dict, np.random.Generator], dict] | None = None
  eval_transform: Callable[[dict], dict] | None = None
  normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None
  repeated_aug: int = 1
  eval_threads: int = 4

  def split(self, name: str):
    if name not in self.splits:
      raise ValueError(f"data set {self.name!r} has no split {name!r}; splits: {sorted(self.splits)}")
    return self.splits[name]

  def num_examples(self, split: str = "train") -> int:
    return len(self.split(split))

  def sample_batch(self, batch_size: int = 2) -> dict[str, np.ndarray]:
    return self._read(self.split("train"), np.arange(min(batch_size, self.num_examples())))

  def _read(self, source, indices: np.ndarray, rngs=None) -> dict[str, np.ndarray]:
    """Examples `indices` of `source` as a batch, through the per-example transform (train when `rngs`)."""
    if rngs is not None and self.train_transform is not None:
      rows = [self.train_transform(source[int(i)], rng) for i, rng in zip(indices, rngs, strict=True)]
    elif self.eval_transform is not None:
      rows = [self.eval_transform(source[int(i)]) for i in indices]
    else:
      return _take(source, indices)
    return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}

  def device_preprocess(self, batch: dict) -> dict:
    """What runs on the device before the model: uint8 `inputs` become float32 `(x / 255 - mean) / std`."""
    if self.normalize is None:
      return batch
    return {**batch, "inputs": _normalize_fn()(batch["inputs"], *(np.asarray(v, np.float32) for v in self.normalize))}

  def train_indices(self, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Global indices of the batch at `step`: a fresh permutation each epoch, remainder dropped."""
    n = self.num_examples("train")
    if batch_size > n:
      raise ValueError(f"data.batch_size={batch_size} exceeds the {n} training examples of {self.name!r}")
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    perm = _epoch_permutation(seed, epoch, n)
    r = self.repeated_aug
    if r <= 1:
      return perm[k * batch_size:(k + 1) * batch_size]
    # Repeated augmentation: each image r times in a row (each copy augmented differently), n examples per
    # epoch. Within a batch, copy j goes to the j-th block (timm's RASampler hands copies to different
    # replicas), so each process's slice holds distinct images where the sizes allow.
    batch = perm[np.arange(k * batch_size, (k + 1) * batch_size) // r]
    if batch_size % r == 0:
      batch = batch.reshape(-1, r).T.reshape(-1)
    return batch

  def train_batch(self, step: int, batch_size: int, seed: int, *, process_index: int = 0,
                  process_count: int = 1, split: str = "train") -> dict[str, np.ndarray]:
    """This process's part of the global training batch of `step` (augmented)."""
    idx = self.train_indices(step, batch_size, seed)
    local = batch_size // process_count
    idx = idx[process_index * local:(process_index + 1) * local]
    rngs = None
    if self.train_transform is not None:  # one stream per global position: independent of the process count
      first = process_index * local
      rngs = [np.random.default_rng([seed, step, 2, first + j]) for j in range(len(idx))]
    batch = self._read(self.split(split), idx, rngs)
    if self.augment is not None:
      rng = np.random.default_rng([seed, step, 1, process_index])
      batch = self.augment(batch, rng)
    return batch

  def train_iterator(self, start_step: int, batch_size: int, seed: int, **kw) -> Iterator[dict]:
    step = start_step
    while True:
      yield self.train_batch(step, batch_size, seed, **kw)
      step += 1

  def eval_batches(self, split: str, batch_size: int, *, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every example of `split` once, in order, the last batch padded with `mask` = 0.

    Sets with a per-example `eval_transform` (decode, resize, crop) read their batches on `eval_threads`
    grain read threads (Pillow releases the GIL while it decodes and resamples); the order is kept.
    """
    source = self.split(split)
    n = len(source)
    local = batch_size // process_count
    sl = slice(process_index * local, (process_index + 1) * local)

    def batch_at(start):
      idx = np.arange(start, start + batch_size)
      mask = (idx < n).astype(np.float32)
      batch = self._read(source, np.minimum(idx, n - 1)[sl])
      batch["mask"] = mask[sl]
      return batch

    starts = range(0, n, batch_size)
    if self.eval_transform is None or self.eval_threads <= 0:
      yield from (batch_at(s) for s in starts)
      return
    import grain
    ds = grain.MapDataset.source(list(starts)).map(batch_at)
    yield from ds.to_iter_dataset(grain.ReadOptions(num_threads=self.eval_threads, prefetch_buffer_size=2))


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The example order of one epoch (cached: a permutation of a million indices costs ~20 ms; read-only)."""
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  perm.flags.writeable = False
  return perm


@functools.cache
def _normalize_fn():
  import jax
  import jax.numpy as jnp
  return jax.jit(lambda x, mean, std: (x.astype(jnp.float32) / 255.0 - mean) / std)


def get_dataset(data_cfg, checkpoint_meta: dict | None = None) -> Dataset:
  """Builds the data set named by `data_cfg.name`.

  `checkpoint_meta`: the meta of the checkpoint the model comes from (`init_from.path`, or the evaluated
  one); image sets take its `preprocessing` (size, mean, std, interpolation, crop_pct) for the `data.*`
  keys left unset (`jaxlab.data.images.resolve`).

  Raises:
    ValueError: for an unknown name, listing the known ones.
  """
  name = data_cfg.get("name")
  builder = DATASETS.get(name)
  if checkpoint_meta and "checkpoint_meta" in inspect.signature(builder).parameters:
    dataset = builder(data_cfg, checkpoint_meta=checkpoint_meta)
  else:
    dataset = builder(data_cfg)
  train_split = data_cfg.get("train_split") or "train"
  if train_split != "train":  # e.g. a learned soup trains its mixing weights on 'heldout'
    if train_split not in dataset.splits:
      raise ValueError(f"config.data.train_split: data set {name!r} has no split {train_split!r}; "
                       f"splits: {sorted(dataset.splits)}")
    dataset.splits = {**dataset.splits, "train": dataset.splits[train_split]}
  dataset.repeated_aug = int(data_cfg.get("repeated_aug", 1) or 1)
  if dataset.repeated_aug < 1:
    raise ValueError(f"config.data.repeated_aug={dataset.repeated_aug}: use 1 (off) or the number of copies")
  return dataset


def checkpoint_meta_for(config) -> dict | None:
  """The meta of `config.init_from.path` (read without the weights), or None when there is none."""
  path = (config.get("init_from") or {}).get("path") if hasattr(config, "get") else None
  if not path:
    return None
  from jaxlab import checkpoint
  try:
    return checkpoint.load_meta(path)
  except (OSError, ValueError):  # a bad path is reported with its config key when the weights are loaded
    return None


def image_augment(shift: int = 0, noise: float = 0.0, flip: bool = False):
  """Light augmentation for [B, H, W, C] float images: random shifts (zero pad), noise, flips."""
  if not (shift or noise or flip):
    return None

  def augment(batch, rng: np.random.Generator):
    x = batch["inputs"]
    if shift:
      b, h, w = x.shape[:3]
      padded = np.pad(x, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
      dy = rng.integers(0, 2 * shift + 1, size=b)
      dx = rng.integers(0, 2 * shift + 1, size=b)
      x = np.stack([padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    if flip:
      flips = rng.random(x.shape[0]) < 0.5
      x = np.where(flips[:, None, None, None], x[:, :, ::-1], x)
    if noise:
      x = x + noise * rng.standard_normal(x.shape).astype(x.dtype)
    return {**batch, "inputs": x.astype(np.float32)}

  return augment


def cache_dir(cfg, kind: str) -> str:
  """Where a generated data set `kind` is cached: `data.cache_dir` > `$JAXLAB_CACHE/<kind>` >
  `~/.cache/jaxlab/<kind>`."""
  d = (cfg.get("cache_dir") if cfg is not None and hasattr(cfg, "get") else None) or ""
  if not d:
    root = os.environ.get("JAXLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxlab")
    d = os.path.join(root, kind)
  return os.path.abspath(os.path.expanduser(d))
