"""Named tensorflow-datasets sets through `tfds.data_source` (ArrayRecord) and grain.

`data.name = 'tfds'`, `data.tfds_name = 'mnist'`, `data.data_dir` (optional),
`data.split_map` mapping jaxlab split names to tfds split strings (default:
validation = first 5% of train, heldout = next 5%, train = the rest, test = test, or the
tfds validation split for sets without a test split, such as imagenet2012 and imagenette). No
TensorFlow is needed at run time; preparing a data set once needs the `tf`
extra (`pip install -e '.[tf]'` then `tfds build <name>`).

Image mode: when `data.image_size`, `data.preset`, `data.channels` is set, or a checkpoint's meta
carries `preprocessing` (see `jaxlab.data.images.resolve`), images of any size are read as uint8,
decoded/cropped/augmented per example (`images.TrainTransform` / `EvalTransform`) and normalised on the
device. Otherwise images are read as they are, scaled to [0, 1] float32 (fixed-size sets such as MNIST).
"""

from __future__ import annotations

import grain
import numpy as np

from jaxlab.data import base, images

DEFAULT_SPLITS = {"train": "train[10%:]", "validation": "train[:5%]", "heldout": "train[5%:10%]", "test": "test"}


class _GrainSource:
  """Random access into a tfds data source, decoded through a grain MapDataset."""

  def __init__(self, source, image_key: str, label_key: str):
    self._ds = grain.MapDataset.source(source).map(
        lambda ex: {"inputs": (np.asarray(ex[image_key], np.float32) / 255.0),
                    "label": np.asarray(ex[label_key], np.int32)})
    self._n = len(source)

  def __len__(self):
    return self._n

  def __getitem__(self, i):
    return self._ds[int(i)]


class _RawSource:
  """Random access into a tfds data source, examples as tfds decodes them (picklable for grain workers)."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    return self._source[int(i)]


def _image_mode(cfg, checkpoint_meta) -> bool:
  meta = checkpoint_meta or {}
  from_meta = meta.get("preprocessing") or (meta.get("data") or {}).get("preprocessing")
  return bool(int(cfg.get("image_size", 0) or 0) > 0 or cfg.get("preset", "") or int(cfg.get("channels", 0) or 0)
              or from_meta)


@base.register("tfds")
def build(cfg, checkpoint_meta: dict | None = None) -> base.Dataset:
  import tensorflow_datasets as tfds
  name = cfg.get("tfds_name")
  if not name:
    raise ValueError("config.data.tfds_name: set the tfds data set name (for example 'mnist')")
  split_map = dict(cfg.get("split_map") or DEFAULT_SPLITS)
  try:
    builder = tfds.builder(name, data_dir=cfg.get("data_dir") or None)
  except Exception as e:  # unknown name
    raise ValueError(f"config.data.tfds_name: unknown tfds data set {name!r} ({e})") from e
  if not cfg.get("split_map"):  # sets without a test split (imagenet2012, imagenette): evaluate on validation
    try:
      available = set(builder.info.splits)
    except Exception:  # info of an unprepared set
      available = set()
    if available and "test" not in available and "validation" in available:
      split_map["test"] = "validation"
  splits = {}
  for ours, theirs in split_map.items():
    try:
      src = tfds.data_source(name, split=theirs, data_dir=cfg.get("data_dir") or None)
    except Exception as e:  # not prepared (tfds raises AssertionError / FileNotFoundError variants)
      raise FileNotFoundError(
          f"tfds data set {name!r} (split {theirs!r}) is not prepared in {builder.data_dir}: run "
          f"`pip install -e '.[tf]' && tfds build {name}` (or set config.data.data_dir)") from e
    if _image_mode(cfg, checkpoint_meta):
      splits[ours] = _RawSource(src)
    else:
      splits[ours] = _GrainSource(src, cfg.get("image_key", "image"), cfg.get("label_key", "label"))
  info = builder.info
  image_key, label_key = cfg.get("image_key", "image"), cfg.get("label_key", "label")
  num_classes = info.features[label_key].num_classes
  shape = tuple(info.features[image_key].shape)
  if _image_mode(cfg, checkpoint_meta):
    settings = images.resolve(cfg, checkpoint_meta)
    size = int(settings["image_size"]) or (shape[0] if shape[0] == shape[1] and shape[0] else 0)
    if not size:
      raise ValueError(f"config.data.image_size: tfds set {name!r} has images of varying size {shape}; "
                       "set the model's input size (e.g. 224) or a data.preset")
    settings["image_size"] = size
    channels = int(settings["channels"]) or shape[-1] or 3
    settings["channels"] = channels
    return base.Dataset(
        name=f"tfds:{name}", num_classes=num_classes, splits=splits, input_shape=(size, size, channels),
        train_transform=images.TrainTransform(settings, image_key, label_key),
        eval_transform=images.EvalTransform(settings, image_key, label_key),
        normalize=(images.per_channel(settings["mean"], channels, "mean"),
                   images.per_channel(settings["std"], channels, "std")),
        info={"tfds_name": name, "split_map": split_map,
              "preprocessing": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}})
  aug = base.image_augment(shift=cfg.get("aug_shift", 0), noise=cfg.get("aug_noise", 0.0),
                           flip=cfg.get("aug_flip", False))
  return base.Dataset(name=f"tfds:{name}", num_classes=num_classes, splits=splits,
                      input_shape=shape, augment=aug, info={"tfds_name": name, "split_map": split_map})

