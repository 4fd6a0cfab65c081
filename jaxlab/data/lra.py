"""Long Range Arena from the official release directory (user-supplied, read-only, never downloaded).

Get the release once (about 7 GB unpacked) and point `data.lra_dir` at it:

    wget https://storage.googleapis.com/long-range-arena/lra_release.gz
    tar xzf lra_release.gz        # -> lra_release/ (the archive nests a second lra_release/ inside)

Either `lra_release/` or the nested `lra_release/lra_release/` works as `data.lra_dir`. Two tasks:

`lra_listops`: `listops-1000/basic_{train,val,test}.tsv` (tab separated, header `Source\tTarget`). Sources
  are tokenised as the S4 code does: whitespace split, parentheses dropped, then the built-in ListOps ids
  (`jaxlab.data.sequences.LISTOPS_VOCAB`: `<pad>`=0, `[MIN`..`[SM`=1..4, `]`=5, digits 6..15), truncated
  to `data.max_length` (LRA: 2000) and right-padded with 0. Each example carries its true `length`
  (tokens before padding); sequence models compute and pool over the real tokens (`model.pool_pad_id`,
  default 0 for token inputs; docs/fairness.md).
  Splits: train, validation (= val), test as released.
`lra_pathfinder`: `pathfinder{R}/{difficulty dir}/metadata/*.npy` (text files despite the name; each line
  `imgs/<k> sample_<n>.png <id> <label> ...`, the label in the fourth field, as LRA's own TFDS builder
  reads them) and the PNGs they name. `data.image_size` R (32; 64, 128, 256 exist), `data.difficulty`
  'easy' | 'intermediate' | 'hard' (LRA: hard = curv_contour_length_14). Images are read lazily (one PNG
  per example, so grain workers share the decoding) and flattened row-major to float32 [R^2, 1] in [0, 1],
  the layout of the built-in `pathfinder`. The release has no split; as the S4 code does, a fixed random
  80/10/10 split (numpy `default_rng(0)` permutation of the metadata order) gives train/validation/test.

`Dataset.info` has the built-in sequence tasks' fields (`task`, `vocab_size`, `input_channels`, `seq_len`,
`pad_id`, `split_sizes`), so the S4D/NTFS pipelines take these sets unchanged.
"""

from __future__ import annotations

import csv
import glob
import os

import numpy as np
from PIL import Image

from jaxlab.data import base, sequences

RELEASE_URL = "https://storage.googleapis.com/long-range-arena/lra_release.gz"
LISTOPS_FILES = {"train": "basic_train.tsv", "validation": "basic_val.tsv", "test": "basic_test.tsv"}
PATHFINDER_DIRS = {"easy": "curv_baseline", "intermediate": "curv_contour_length_9", "hard": "curv_contour_length_14"}
_CACHE: dict[tuple, dict] = {}


def _locate(lra_dir: str, rel: str) -> str:
  """`lra_dir/rel` or `lra_dir/lra_release/rel` (the archive nests one level); errors name the key."""
  if not lra_dir:
    raise ValueError(f"config.data.lra_dir: set the path of the Long Range Arena release (from {RELEASE_URL})")
  for root in (lra_dir, os.path.join(lra_dir, "lra_release")):
    if os.path.exists(os.path.join(root, rel)):
      return os.path.join(root, rel)
  raise FileNotFoundError(
    f"config.data.lra_dir={lra_dir}: no {rel} in it (nor in lra_release/ inside); "
    f"download {RELEASE_URL} and extract it (tar xzf), then point data.lra_dir at it"
  )


def tokenize_listops(source: str, where: str) -> list[int]:
  """Token ids of one ListOps source string (parentheses dropped)."""
  ids = []
  for tok in source.split():
    if tok in ("(", ")"):
      continue
    if tok not in sequences.TOKEN_ID or tok == sequences.LISTOPS_VOCAB[sequences.LISTOPS_PAD]:
      raise ValueError(f"{where}: unknown ListOps token {tok!r}; expected one of {sequences.LISTOPS_VOCAB[1:]}")
    ids.append(sequences.TOKEN_ID[tok])
  return ids


def read_listops_tsv(path: str, max_length: int) -> dict[str, np.ndarray]:
  """`inputs` int32 [N, max_length] (0-padded), `label` int32 [N], `length` int32 [N] of one LRA TSV."""
  rows, labels = [], []
  with open(path, newline="") as f:
    reader = csv.reader(f, delimiter="\t")
    header = next(reader, None)
    if not header or [h.strip() for h in header[:2]] != ["Source", "Target"]:
      raise ValueError(f"{path}: expected the LRA header 'Source<TAB>Target', got {header!r}")
    for n, rec in enumerate(reader, start=2):
      if not rec:
        continue
      if len(rec) < 2:
        raise ValueError(f"{path}:{n}: expected two tab-separated fields (Source, Target)")
      try:
        label = int(rec[1])
      except ValueError:
        raise ValueError(f"{path}:{n}: Target {rec[1]!r} is not an integer 0..9") from None
      if not 0 <= label <= 9:
        raise ValueError(f"{path}:{n}: Target {label} is outside 0..9")
      rows.append(tokenize_listops(rec[0], f"{path}:{n}")[:max_length])
      labels.append(label)
  x = np.full((len(rows), max_length), sequences.LISTOPS_PAD, np.int32)
  for i, r in enumerate(rows):
    x[i, : len(r)] = r
  return {"inputs": x, "label": np.asarray(labels, np.int32), "length": np.asarray([len(r) for r in rows], np.int32)}


@base.register("lra_listops")
def build_listops(cfg) -> base.Dataset:
  """ListOps from `data.lra_dir` (see the module docstring); keys: lra_dir, max_length (2000)."""
  max_length = int(cfg.get("max_length", 2000) or 2000)
  folder = _locate(cfg.get("lra_dir", ""), "listops-1000")
  key = ("listops", os.path.abspath(folder), max_length)
  if key not in _CACHE:
    _CACHE[key] = {
      s: read_listops_tsv(_locate(cfg.get("lra_dir", ""), os.path.join("listops-1000", f)), max_length)
      for s, f in LISTOPS_FILES.items()
    }
  splits = {s: base.ArraySource(a) for s, a in _CACHE[key].items()}
  info = {
    "task": "listops",
    "vocab_size": len(sequences.LISTOPS_VOCAB),
    "input_channels": 1,
    "seq_len": max_length,
    "pad_id": sequences.LISTOPS_PAD,
    "split_sizes": {k: len(v) for k, v in splits.items()},
    "vocab": list(sequences.LISTOPS_VOCAB),
    "source": os.path.abspath(folder),
  }
  return base.Dataset(
    name="lra_listops", num_classes=10, splits=splits, input_shape=(max_length,), input_dtype=np.int32, info=info
  )


class PathfinderSource:
  """Lazy random access to Pathfinder PNGs: `{'inputs': float32 [R^2, 1], 'label': int32, 'length': R^2}`."""

  def __init__(self, paths: list[str], labels: np.ndarray, resolution: int):
    self.paths, self.labels, self.resolution = list(paths), np.asarray(labels, np.int32), resolution

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i):
    i = int(i)
    with Image.open(self.paths[i]) as im:
      x = np.asarray(im.convert("L"), np.float32) / 255.0
    if x.shape != (self.resolution, self.resolution):
      raise ValueError(
        f"{self.paths[i]}: image of shape {x.shape}, expected {self.resolution}x{self.resolution} "
        "(config.data.image_size)"
      )
    return {"inputs": x.reshape(-1, 1), "label": self.labels[i], "length": np.int32(x.size)}


def read_pathfinder_metadata(folder: str) -> tuple[list[str], np.ndarray]:
  """(image paths, labels) of every line of `folder/metadata/*.npy`, files in sorted (numeric) order."""
  files = glob.glob(os.path.join(folder, "metadata", "*.npy"))
  if not files:
    raise FileNotFoundError(f"{folder}/metadata: no *.npy metadata files (config.data.lra_dir)")
  files.sort(key=lambda p: (len(os.path.basename(p)), os.path.basename(p)))
  paths, labels = [], []
  for mf in files:
    with open(mf) as f:
      for n, line in enumerate(f, start=1):
        parts = line.split()
        if not parts:
          continue
        if len(parts) < 4 or parts[3] not in ("0", "1"):
          raise ValueError(f"{mf}:{n}: expected '<dir> <file> <id> <label 0|1> ...', got {line.strip()!r}")
        paths.append(os.path.join(folder, parts[0], parts[1]))
        labels.append(int(parts[3]))
  return paths, np.asarray(labels, np.int32)


@base.register("lra_pathfinder")
def build_pathfinder(cfg) -> base.Dataset:
  """Pathfinder from `data.lra_dir` (see the module docstring); keys: lra_dir, image_size (32), difficulty."""
  res = int(cfg.get("image_size", 0) or 32)
  difficulty = cfg.get("difficulty", "") or "hard"
  if difficulty not in PATHFINDER_DIRS:
    raise ValueError(f"config.data.difficulty: unknown {difficulty!r}; use one of {sorted(PATHFINDER_DIRS)}")
  folder = _locate(cfg.get("lra_dir", ""), os.path.join(f"pathfinder{res}", PATHFINDER_DIRS[difficulty]))
  paths, labels = read_pathfinder_metadata(folder)
  n = len(paths)
  if n < 3:
    raise ValueError(f"{folder}: {n} examples; need at least 3 for train/validation/test")
  perm = np.random.default_rng(0).permutation(n)
  n_test = n_val = max(1, n // 10)
  parts = {"test": perm[:n_test], "validation": perm[n_test : n_test + n_val], "train": perm[n_test + n_val :]}
  splits = {s: PathfinderSource([paths[i] for i in idx], labels[idx], res) for s, idx in parts.items()}
  info = {
    "task": "pathfinder",
    "vocab_size": 0,
    "input_channels": 1,
    "seq_len": res * res,
    "pad_id": -1,
    "split_sizes": {k: len(v) for k, v in splits.items()},
    "source": os.path.abspath(folder),
    "difficulty": difficulty,
  }
  return base.Dataset(name="lra_pathfinder", num_classes=2, splits=splits, input_shape=(res * res, 1), info=info)
