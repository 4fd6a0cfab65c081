"""MNIST-1D (Greydanus and Kobak, 2020/2024): 1D digit signals, generated offline by the `mnist1d` package.

The data are produced by the package's own generator, `mnist1d.data.make_dataset`,
from `get_dataset_args()` (the published defaults: 5000 signals, 80/20
train/test, sequence length 40, generator seed 42), so with default options this
is the published benchmark: 4000 training and 1000 test signals of 10 classes.
Config keys in `config.data` may change the package's knobs:

    num_samples (5000), train_split (0.8), final_seq_length (40),
    max_translation (48), corr_noise_scale (0.25), iid_noise_scale (0.02),
    shear_scale (0.75), scale_coeff (0.4), shuffle_seq (False),
    generator_seed (42): the package's `seed` argument.

Splits: `test` is the package's test set. `validation` and `heldout` (for model
selection, e.g. greedy soups) are carved from the package's training set by a
fixed permutation (`np.random.default_rng(0)`, the same rule as `digits`): the
first `validation_size` (default 400) are `validation`, the next
`heldout_size` (default 400) `heldout`, the rest `train` (3200 by default).
A size of 0 drops that split. `train_size` (0 = all) keeps only the first
`train_size` of the remaining training signals (data-limited experiments).

Inputs are float32 `[T, 1]` (T = final_seq_length, 40): a 1-channel signal for
image-style models (a ViT with 1D patches, a 1D CNN) and a length-T sequence of
1-dimensional tokens for sequence models; `Dataset.info` carries
`vocab_size: 0`, `input_channels: 1` and `seq_len: T` for them.

Generation takes a few seconds, so the arrays are cached as `.npz` in
`data.cache_dir`, else `$JAXLAB_CACHE/mnist1d`, else `~/.cache/jaxlab/mnist1d`,
keyed by a hash of the generator arguments (`data.cache = False` turns caching
off). Augmentation (training batches only): `aug_shift` (random circular shift
by up to that many steps) and `aug_noise` (Gaussian noise std).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile

import numpy as np

from jaxlab.data import base

NUM_CLASSES = 10
DEFAULT_VALIDATION_SIZE = 400
DEFAULT_HELDOUT_SIZE = 400
EXTRA_HINT = "pip install -e '.[mnist1d]'"

# config.data key -> the package's argument name (the package's defaults are used for keys left unset).
KNOBS = {
    "num_samples": "num_samples",
    "train_split": "train_split",
    "final_seq_length": "final_seq_length",
    "max_translation": "max_translation",
    "corr_noise_scale": "corr_noise_scale",
    "iid_noise_scale": "iid_noise_scale",
    "shear_scale": "shear_scale",
    "scale_coeff": "scale_coeff",
    "shuffle_seq": "shuffle_seq",
    "generator_seed": "seed",
}


class MissingExtraError(ImportError, ValueError):
  """An optional dependency is not installed; the message names the extra to install.

  A `ValueError` too, so `python -m jaxlab.main` reports it as a one-line error.
  """


def _import_package():
  try:
    import mnist1d.data as m1d
  except ImportError as e:
    import sys
    shadow = getattr(sys.modules.get("mnist1d"), "__file__", None)
    if shadow and not shadow.endswith("__init__.py"):
      raise MissingExtraError(f"config.data.name='mnist1d': the file {shadow} shadows the `mnist1d` package "
                              "(it comes first on sys.path); run from another directory or rename it") from e
    raise MissingExtraError(
        f"config.data.name='mnist1d' needs the `mnist1d` package, which is not installed ({e}); "
        f"install the extra: {EXTRA_HINT}") from e
  return m1d


def generator_args(cfg=None) -> dict:
  """The package's default generator arguments with `cfg`'s knob overrides (no `url`).

  Raises:
    MissingExtraError: when the `mnist1d` package is not installed.
    ValueError: for an out-of-range knob, naming the config key.
  """
  m1d = _import_package()
  args = m1d.get_dataset_args(as_dict=True)
  args = {k: v for k, v in args.items() if k != "url"}
  cfg = cfg or {}
  for key, arg in KNOBS.items():
    val = cfg.get(key) if hasattr(cfg, "get") else None
    if val is not None:
      args[arg] = type(args[arg])(val) if not isinstance(args[arg], list) else list(val)
  if args["num_samples"] < NUM_CLASSES:
    raise ValueError(f"config.data.num_samples={args['num_samples']} must be at least {NUM_CLASSES}")
  if not 0.0 < args["train_split"] < 1.0:
    raise ValueError(f"config.data.train_split={args['train_split']} must be in (0, 1)")
  if args["final_seq_length"] < 2:
    raise ValueError(f"config.data.final_seq_length={args['final_seq_length']} must be at least 2")
  return args


def cache_dir(cfg=None) -> str:
  """Where generated arrays are cached: `data.cache_dir` > `$JAXLAB_CACHE/mnist1d` > `~/.cache/jaxlab/mnist1d`."""
  return base.cache_dir(cfg, "mnist1d")


def _cache_key(args: dict) -> str:
  import mnist1d
  version = getattr(mnist1d, "__version__", "")
  if not version:
    try:
      import importlib.metadata as md
      version = md.version("mnist1d")
    except Exception:  # noqa: BLE001  (version only salts the key)
      version = "unknown"
  blob = json.dumps({"args": args, "package": version}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def generate(args: dict) -> dict[str, np.ndarray]:
  """Runs the package's generator; returns `x`, `y`, `x_test`, `y_test` as the package made them.

  The package seeds numpy's and Python's global random generators; their
  states are restored afterwards so generation has no side effect on the caller.
  """
  m1d = _import_package()
  from mnist1d.utils import ObjectView
  np_state, py_state = np.random.get_state(), random.getstate()
  try:
    d = m1d.make_dataset(ObjectView(dict(args)))
  finally:
    np.random.set_state(np_state)
    random.setstate(py_state)
  return {k: np.asarray(d[k]) for k in ("x", "y", "x_test", "y_test")}


def load_arrays(cfg=None) -> tuple[dict[str, np.ndarray], dict]:
  """The generated arrays (from the cache when present) and the generator arguments used.

  Returns:
    (`{'x': [N, T] float64, 'y': [N] int64, 'x_test', 'y_test'}` exactly as the package
    generates them, generator args).

  Raises:
    MissingExtraError: when the `mnist1d` package is not installed.
  """
  args = generator_args(cfg)
  use_cache = bool(cfg.get("cache", True)) if cfg is not None and hasattr(cfg, "get") else True
  path = os.path.join(cache_dir(cfg), f"mnist1d_{_cache_key(args)}.npz")
  if use_cache and os.path.exists(path):
    try:
      with np.load(path) as f:
        return {k: f[k] for k in ("x", "y", "x_test", "y_test")}, args
    except (OSError, ValueError, KeyError):
      pass  # corrupt cache file: regenerate below
  arrays = generate(args)
  if use_cache:
    try:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      fd, tmp = tempfile.mkstemp(suffix=".npz", dir=os.path.dirname(path))
      with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
      os.replace(tmp, path)  # atomic: concurrent readers never see a half-written file
    except OSError:
      pass  # an unwritable cache only costs regeneration
  return arrays, args


def split_indices(n: int, validation_size: int, heldout_size: int, train_size: int = 0) -> dict[str, np.ndarray]:
  """Disjoint index sets into the package's training set: validation, heldout, train.

  Raises:
    ValueError: when the sizes do not fit into `n`.
  """
  if validation_size < 0 or heldout_size < 0 or train_size < 0:
    raise ValueError("config.data.validation_size / heldout_size / train_size must be >= 0")
  if validation_size + heldout_size >= n:
    raise ValueError(f"config.data.validation_size={validation_size} + heldout_size={heldout_size} leave no "
                     f"training signals out of {n}")
  perm = np.random.default_rng(0).permutation(n)
  out = {}
  if validation_size:
    out["validation"] = perm[:validation_size]
  if heldout_size:
    out["heldout"] = perm[validation_size:validation_size + heldout_size]
  rest = perm[validation_size + heldout_size:]
  if train_size:
    if train_size > len(rest):
      raise ValueError(f"config.data.train_size={train_size} exceeds the {len(rest)} training signals left")
    rest = rest[:train_size]
  out["train"] = rest
  return out


def signal_augment(shift: int = 0, noise: float = 0.0):
  """Augmentation for [B, T, C] signals: random circular shifts by up to `shift` steps, Gaussian noise."""
  if not (shift or noise):
    return None

  def augment(batch, rng: np.random.Generator):
    x = batch["inputs"]
    if shift:
      s = rng.integers(-shift, shift + 1, size=x.shape[0])
      t = np.arange(x.shape[1])
      x = x[np.arange(x.shape[0])[:, None], (t[None, :] - s[:, None]) % x.shape[1]]
    if noise:
      x = x + noise * rng.standard_normal(x.shape).astype(x.dtype)
    return {**batch, "inputs": x.astype(np.float32)}

  return augment


@base.register("mnist1d")
def build(cfg) -> base.Dataset:
  """Builds MNIST-1D from `config.data` (see the module docstring for every key).

  Raises:
    MissingExtraError: when the `mnist1d` package is not installed.
    ValueError: for bad sizes or knobs, naming the config key.
  """
  arrays, args = load_arrays(cfg)
  x = arrays["x"].astype(np.float32)[..., None]
  y = arrays["y"].astype(np.int32)
  x_test = arrays["x_test"].astype(np.float32)[..., None]
  y_test = arrays["y_test"].astype(np.int32)
  idx = split_indices(len(x), int(cfg.get("validation_size", DEFAULT_VALIDATION_SIZE)),
                      int(cfg.get("heldout_size", DEFAULT_HELDOUT_SIZE)), int(cfg.get("train_size", 0) or 0))
  splits = {k: base.ArraySource({"inputs": x[i], "label": y[i]}) for k, i in idx.items()}
  splits["test"] = base.ArraySource({"inputs": x_test, "label": y_test})
  seq_len = int(x.shape[1])
  aug = signal_augment(shift=int(cfg.get("aug_shift", 0) or 0), noise=float(cfg.get("aug_noise", 0.0) or 0.0))
  info = {"split_sizes": {k: len(v) for k, v in splits.items()}, "vocab_size": 0, "input_channels": 1,
          "seq_len": seq_len, "generator_args": args}
  return base.Dataset(name="mnist1d", num_classes=NUM_CLASSES, splits=splits, input_shape=(seq_len, 1),
                      augment=aug, info=info)


def data_config(**overrides):
  """A `config.data` with every MNIST-1D key at its default, for experiment configs.

  `c.data = mnist1d.data_config(batch_size=100)` makes every key overridable on
  the command line (`--config.data.iid_noise_scale=0.05`). Knobs left at None
  use the package's defaults.

  Returns:
    an `ml_collections.ConfigDict`.
  """
  import ml_collections
  c = ml_collections.ConfigDict()
  c.name = "mnist1d"
  c.batch_size = 100
  c.eval_batch_size = 500
  c.validation_size = DEFAULT_VALIDATION_SIZE
  c.heldout_size = DEFAULT_HELDOUT_SIZE
  c.train_size = 0
  c.aug_shift = 0
  c.aug_noise = 0.0
  c.cache = True
  c.cache_dir = ""
  for key, kind in (("num_samples", int), ("train_split", float), ("final_seq_length", int),
                    ("max_translation", int), ("corr_noise_scale", float), ("iid_noise_scale", float),
                    ("shear_scale", float), ("scale_coeff", float), ("shuffle_seq", bool),
                    ("generator_seed", int)):
    c[key] = ml_collections.config_dict.placeholder(kind)
  c.update(overrides)
  return c
