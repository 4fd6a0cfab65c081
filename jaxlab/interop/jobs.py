"""The `import` and `export` jobs: foreign checkpoint files <-> ordinary jaxlab checkpoints.

    python -m jaxlab.main --config=ml_collections_configs/import.py \
        --config.source=deit_small.safetensors --workdir=runs/deit_s
    python -m jaxlab.main --config=ml_collections_configs/export.py \
        --config.checkpoint=runs/deit_s --config.format=timm --config.out=out.safetensors --workdir=runs/export

Import: open the file read-only (`readers`), pick the family from its names
(`timm_vit`, `big_vision_vit`, `mixturegrowth_wrn`, or `jaxlab` for a file this
module exported with `format=jaxlab`), infer the model config from names and
shapes (explicit config keys win), compare the file's tensors with the name map
strictly (one error lists the missing, unexpected and mis-shaped ones and the
options that allow them; nothing is written), convert one tensor at a time,
optionally resample the position embeddings to `image_size`, check the result
against the model's variable shapes (computed from the config for a plain ViT,
`jax.eval_shape` of its init otherwise), and write a step-0 checkpoint (the
file's sha256 is computed on another thread meanwhile) whose meta records the
source, its sha256, the format, the family
and name map, what was skipped or initialised fresh, and the preprocessing.

Export: load a checkpoint from its meta, materialize its parameterization (a
TLEG auxiliary net or a soup exports the network it computes), and write
safetensors (or, for `format=timm`, a PyTorch `.pth` state dict: `pth`):
`format=timm` with timm's keys and shapes for a `vit` model;
`format=jaxlab` for any model, as a plain state dict whose keys are jaxlab's
`collection/path` names (blocks stacked on the depth axis) with the checkpoint
meta in the file's metadata, which `import` reads back bitwise. A model timm
cannot express (a low-rank ViT, a WRN) is refused for `format=timm` with a
message that names `format=jaxlab`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable, Sequence

import jax
import numpy as np

from jaxlab import build, checkpoint, trees
from jaxlab.interop import names, pth, readers, resample, vit_maps, wrn_maps

JAXLAB_META_KEY = "jaxlab_meta"


@dataclasses.dataclass(frozen=True)
class Family:
  """A model family in a foreign naming: how to detect it, infer its config and map its names."""

  name: str
  detect: Callable[[set], bool]
  infer: Callable[[dict, dict], dict]
  preprocessing: dict
  resample: str = "bicubic"
  skip: tuple[str, ...] = ()


FAMILIES = {
  "timm_vit": Family(
    "timm_vit", lambda k: "patch_embed.proj.weight" in k, vit_maps.timm_infer, vit_maps.TIMM_PREPROCESSING
  ),
  "big_vision_vit": Family(
    "big_vision_vit",
    lambda k: any(x.endswith("embedding/kernel") for x in k),
    vit_maps.big_vision_infer,
    vit_maps.BIG_VISION_PREPROCESSING,
    resample="big_vision",
  ),
  "mixturegrowth_wrn": Family(
    "mixturegrowth_wrn",
    lambda k: "conv_stem.weight" in k,
    wrn_maps.infer,
    wrn_maps.CIFAR_PREPROCESSING,
    skip=wrn_maps.SKIP,
  ),
}


def _entries(family: str, info: dict, keys, abstract: dict) -> list[names.Entry]:
  model, k = info["model"], info["num_classes"]
  if family == "timm_vit":
    return vit_maps.timm_entries(model, k)
  if family == "big_vision_vit":
    return vit_maps.big_vision_entries(model, k, vit_maps.big_vision_layout(keys))
  return wrn_maps.entries(model, k, set(abstract))


def detect_family(keys: Sequence[str], path: str, family: str = "auto") -> str:
  """The family of a file from its tensor names (`family` when given).

  Raises:
    ValueError: an unknown family name, or names that match no family.
  """
  if family not in ("auto", "jaxlab", *FAMILIES):
    raise ValueError(f"config.family={family!r}: choose auto, jaxlab, {', '.join(FAMILIES)}")
  if family != "auto":
    return family
  key_set = set(keys)
  for name, fam in FAMILIES.items():
    if fam.detect(key_set):
      return name
  raise ValueError(
    f"{path}: cannot tell the model family from its tensor names (first: "
    f"{', '.join(sorted(key_set)[:4])}); set config.family to one of {', '.join(FAMILIES)}"
  )


@dataclasses.dataclass
class Imported:
  """An imported checkpoint before it is written: trainable params, other collections, meta."""

  theta: dict
  model_state: dict
  meta: dict


def _abstract(model_cfg: dict, num_classes: int, input_shape) -> dict[str, jax.ShapeDtypeStruct]:
  """`collection/path` -> struct of the model's variables: computed from the config for a plain ViT
  (`vit_maps.vit_param_shapes`), else by tracing its init (`jax.eval_shape`)."""
  module = build.model(model_cfg, num_classes)
  shapes = vit_maps.vit_param_shapes(module, input_shape)
  if shapes is not None:
    return shapes
  return trees.flatten(build.abstract_variables(module, tuple(input_shape), "float32"))


def _given(options: dict) -> dict:
  return {k: options.get(k) for k in ("num_heads", "num_classes", "pool", "ln_eps", "image_size")}


def import_file(
  path: str,
  *,
  format: str = "auto",
  family: str = "auto",
  num_heads: int = 0,
  num_classes: int = 0,
  image_size: int = 0,
  pool: str = "",
  ln_eps: float = 0.0,
  skip_unexpected: Sequence[str] = (),
  init_missing: Sequence[str] = (),
  resample_method: str = "",
  seed: int = 0,
  preprocessing: dict | None = None,
  compute_sha256: bool = True,
) -> Imported:
  """Reads a timm / PyTorch / big_vision / jaxlab-exported file into a jaxlab tree and meta (nothing written).

  Args:
    path: the file (read only).
    format: `auto` (by extension), `safetensors`, `torch` or `npz`.
    family: `auto` (by tensor names), `timm_vit`, `big_vision_vit`, `mixturegrowth_wrn` or `jaxlab`.
    num_heads, num_classes, pool, ln_eps: model values that override the inferred ones (0 / '' = infer;
      heads default to width / 64).
    image_size: the model's image side; when it differs from the checkpoint's, the position embeddings are
      resampled (`resample_method`: `bicubic` as timm, `big_vision` as big_vision; the family's default
      when empty).
    skip_unexpected: regexes of file keys that may stay unused.
    init_missing: regexes of jaxlab `collection/path` names (e.g. `params/head/.*`) initialised fresh (from
      `seed`) when the file lacks them or has them in another shape.
    preprocessing: overrides of `mean`, `std`, `interpolation`, `crop_pct` (family defaults otherwise).
    compute_sha256: hash the file for the meta (off only in benchmarks that time reading alone).

  Raises:
    FileNotFoundError, readers.ReadError, vit_maps.InferenceError, names.NameMapError, ValueError.
  """
  skip_unexpected, init_missing = names.regex_list(skip_unexpected), names.regex_list(init_missing)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.source={path}: no such file")
  hasher = readers.BackgroundSha256(path) if compute_sha256 else None  # on another core, during the conversion
  options = dict(num_heads=num_heads, num_classes=num_classes, pool=pool, ln_eps=ln_eps, image_size=image_size)
  with readers.open_source(path, format) as src:
    if family == "auto" and JAXLAB_META_KEY in getattr(src, "metadata", {}):
      family = "jaxlab"  # written by the export job with format=jaxlab
    fam_name = detect_family(src.keys(), path, family)
    if fam_name == "jaxlab":
      return _import_jaxlab(src, path, hasher)
    versions = readers.InThread(checkpoint.versions)  # package versions and git state (a subprocess), meanwhile
    fam = FAMILIES[fam_name]
    shapes = {k: tuple(src.shape(k)) for k in src.keys()}
    try:
      info = fam.infer(shapes, _given(options))
    except vit_maps.InferenceError as e:
      raise vit_maps.InferenceError(f"{path}: cannot infer the model config as {fam_name} ({e})") from e
    model_cfg, k, input_shape = info["model"], info["num_classes"], list(info["input_shape"])
    if k <= 0:
      raise ValueError(
        f"{path}: the file has no classifier head; set config.num_classes and "
        "config.init_missing='params/head.*' to add a fresh one"
      )
    try:
      abstract = _abstract(model_cfg, k, input_shape)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{path}: the inferred model config {model_cfg} does not build ({e})") from e
    entries = _entries(fam_name, info, shapes, abstract)
    covered = {f"{e.collection}/{e.ours}" for e in entries}
    if covered != set(abstract):
      raise RuntimeError(f"name map {fam_name} out of date with the model: {sorted(covered ^ set(abstract))[:4]}")
    depth = int(model_cfg.get("depth", 0))
    fresh_names = {n for n in abstract if trees.first_match(n, init_missing) is not None}
    allow = [key for e in entries if f"{e.collection}/{e.ours}" in fresh_names for key in e.keys(depth)]
    expected = names.expected_shapes(entries, abstract, depth)
    skipped, not_taken = names.check(path, shapes, expected, fam.skip + skip_unexpected, allow, fam_name)
    take_fresh = {f"{e.collection}/{e.ours}" for e in entries if set(e.keys(depth)) & set(not_taken)}
    fresh = {}
    if take_fresh:
      module = build.model(model_cfg, k)
      fresh = trees.flatten(jax.device_get(build.init_variables(module, jax.random.key(seed), input_shape)))
    dtypes = {n: np.dtype(s.dtype) for n, s in abstract.items()}
    source_dtypes = sorted({str(src.dtype(key)) for key in src.keys() if key not in skipped})
    shapes = {n: tuple(s.shape) for n, s in abstract.items()}
    flat = names.import_tree(src, entries, depth, fresh, take_fresh, dtypes, shapes=shapes)
  shaped = [
    trees.shape_difference(n, abstract[n], a, ("model", "converted")) for n, a in flat.items()
    if tuple(a.shape) != tuple(abstract[n].shape)
  ]
  if shaped:
    raise names.NameMapError(trees.mismatch_message(
      f"{path}: converted tensors do not fit the model", shaped, "check config.num_heads and the other model keys"))
  resampled = None
  if image_size and image_size != input_shape[0]:
    flat, input_shape, resampled = _resample(
      flat, model_cfg, input_shape, int(image_size), info.get("grid"), resample_method or fam.resample, path
    )
  tree = trees.unflatten(flat)
  pre = dict(fam.preprocessing, **{key: v for key, v in (preprocessing or {}).items() if v not in (None, "", (), 0)})
  meta = {
    "model": model_cfg,
    "parameterization": {"name": "identity"},
    "data": {
      "name": "imported",
      "num_classes": k,
      "input_shape": input_shape,
      "input_dtype": "float32",
      "config": {"name": ""},
    },
    "objective": {},
    "step": 0,
    "metrics": {},
    "preprocessing": {
      "image_size": input_shape[:2],
      "mean": [float(x) for x in pre["mean"]],
      "std": [float(x) for x in pre["std"]],
      "interpolation": str(pre["interpolation"]),
      "crop_pct": float(pre["crop_pct"]),
    },
    "provenance": {
      "import": {
        "source": os.path.abspath(path),
        "sha256": hasher.result() if hasher else None,
        "format": readers.detect_format(path, format),
        "family": fam_name,
        "name_map": f"jaxlab.interop.{fam_name}",
        "source_dtypes": source_dtypes,
        "skipped": skipped,
        "initialized": sorted(take_fresh),
        "resampled_pos_embed": resampled,
        "options": options,
      }
    },
    "versions": versions.result(),
  }
  return Imported(theta=tree["params"], model_state={c: v for c, v in tree.items() if c != "params"}, meta=meta)


def _resample(flat, model_cfg, input_shape, image_size, grid, method, path):
  if model_cfg.get("name") != "vit":
    # convolutional nets run at any size: only the recorded input size changes
    return flat, [image_size, image_size, input_shape[2]], None
  p = int(model_cfg["patch_size"])
  if image_size % p:
    raise ValueError(f"config.image_size={image_size} is not a multiple of the patch size {p}")
  n_prefix = (
    0
    if model_cfg.get("no_embed_class")
    else int(bool(model_cfg.get("class_token"))) + int(bool(model_cfg.get("distilled")))
  )
  new = image_size // p
  flat = dict(flat)
  flat["params/pos_embed"] = resample.resample_pos_embed(
    flat["params/pos_embed"], n_prefix, (grid, grid), (new, new), method
  )
  return flat, [image_size, image_size, input_shape[2]], {"from": [grid, grid], "to": [new, new], "method": method}


def _import_jaxlab(src, path: str, hasher: readers.BackgroundSha256 | None) -> Imported:
  meta_json = getattr(src, "metadata", {}).get(JAXLAB_META_KEY) if hasattr(src, "metadata") else None
  if not meta_json:
    raise ValueError(
      f"{path}: no '{JAXLAB_META_KEY}' metadata; only files written by the export job with "
      "config.format=jaxlab import as family 'jaxlab'"
    )
  meta = json.loads(meta_json)
  abstract = trees.flatten(checkpoint.abstract_weights(meta))
  present = {key: tuple(src.shape(key)) for key in src.keys()}
  expected = {n: tuple(s.shape) for n, s in abstract.items()}
  names.check(path, present, expected, map_name="jaxlab")
  flat = {n: src.get(n).astype(abstract[n].dtype, copy=False) for n in expected}
  tree = trees.unflatten(flat)
  meta = dict(meta, step=0, metrics={})
  meta["provenance"] = {
    "import": {
      "source": os.path.abspath(path),
      "sha256": hasher.result() if hasher else None,
      "format": "safetensors",
      "family": "jaxlab",
      "name_map": "identity",
      "previous_provenance": meta.get("provenance", {}),
    }
  }
  return Imported(theta=tree["theta"], model_state=tree.get("model_state", {}), meta=meta)


def check_output_dir(workdir: str) -> None:
  out_ckpt = os.path.join(os.path.abspath(workdir), checkpoint.CKPT_SUBDIR)
  if os.path.isdir(out_ckpt) and os.listdir(out_ckpt):
    raise ValueError(f"--workdir={workdir} already holds a checkpoint; choose an empty output directory")


def _preprocessing_options(config) -> dict:
  pre = config.get("preprocessing") or {}
  return {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in build.to_dict(pre).items()}


def run_import(config, workdir: str) -> dict:
  """The `import` job: `config.source` -> a step-0 jaxlab checkpoint in `workdir`."""
  if not config.get("source"):
    raise ValueError("config.source: give the checkpoint file to import (.safetensors, .pth/.bin, .npz)")
  check_output_dir(workdir)
  imp = import_file(
    str(config.source),
    format=config.get("format", "auto"),
    family=config.get("family", "auto"),
    num_heads=int(config.get("num_heads", 0)),
    num_classes=int(config.get("num_classes", 0)),
    image_size=int(config.get("image_size", 0)),
    pool=config.get("pool", ""),
    ln_eps=float(config.get("ln_eps", 0.0)),
    skip_unexpected=config.get("skip_unexpected", ()),
    init_missing=config.get("init_missing", ()),
    resample_method=config.get("resample", ""),
    seed=int(config.get("seed", 0)),
    preprocessing=_preprocessing_options(config),
  )
  imp.meta["config"] = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else {}
  data_cfg = {k: v for k, v in build.to_dict(config.get("data")).items() if v not in ("", None, (), {})}
  if data_cfg.get("name"):  # the data set the model is evaluated / fine-tuned on by default (evaluate job)
    imp.meta["data"].update(name=data_cfg["name"], config=data_cfg)
  # As jax arrays: on a CPU they alias the converted numpy buffers (allocated 64-byte aligned for that; numpy's
  # own large arrays are not, and jax copied them: a second model in memory). Orbax then adds about 0.9x the
  # model while it writes (encoded chunks held until the OCDBT commit). Smaller OCDBT data files
  # (`ocp.args.PyTreeSave(..., ocdbt_target_data_file_size=16 << 20)`) cut that to ~0.35x, but restoring such a
  # checkpoint peaked higher (export: 2.3-2.7x the file instead of 1.9x), so the format stays Orbax's default.
  theta, model_state = jax.device_put(imp.theta), jax.device_put(imp.model_state)
  imp.theta = imp.model_state = None
  checkpoint.save_weights(workdir, 0, theta, imp.meta, model_state)
  prov = imp.meta["provenance"]["import"]
  return {
    "workdir": os.path.abspath(workdir),
    "family": prov["family"],
    "params": trees.count(theta),
    "model": json.dumps({k: v for k, v in imp.meta["model"].items() if v not in (0, 0.0, None, False)}),
  }


# ----------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------


def timm_kwargs(model: dict, num_classes: int, input_shape) -> dict:
  """`timm.create_model` keyword arguments that build the architecture of a jaxlab `vit` config."""
  kw = dict(
    img_size=int(input_shape[0]),
    patch_size=int(model["patch_size"]),
    in_chans=int(input_shape[2]),
    embed_dim=int(model["width"]),
    depth=int(model["depth"]),
    num_heads=int(model["num_heads"]),
    mlp_ratio=float(model["mlp_dim"]) / float(model["width"]),
    num_classes=int(num_classes),
    global_pool="token" if model.get("pool") == "cls" else "avg",
    class_token=bool(model.get("class_token", model.get("pool") == "cls")),
    no_embed_class=bool(model.get("no_embed_class", False)),
    fc_norm=model.get("final_norm") == "pooled",
  )
  if model.get("layer_scale"):
    kw["init_values"] = float(model["layer_scale"])
  return kw


def export_tensors(loaded: checkpoint.Loaded, format: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(name -> array, file metadata) of a loaded checkpoint in the naming of `format` (`timm` or `jaxlab`).

  Raises:
    ValueError: a model that `format` cannot express, or an unknown format.
  """
  meta = loaded.meta
  model, k = dict(meta["model"]), int(meta["data"]["num_classes"])
  if format == "jaxlab":
    flat = trees.flatten({"theta": loaded.theta, "model_state": loaded.model_state})
    return {n: np.asarray(v) for n, v in flat.items()}, {JAXLAB_META_KEY: json.dumps(meta)}
  if format != "timm":
    raise ValueError(f"config.format={format!r}: choose timm or jaxlab")
  name = model.get("name")
  input_shape = meta["data"]["input_shape"]
  if name != "vit" or len(input_shape) != 3:
    what = {"lowrank_vit": "a low-rank (factorized) ViT", "wrn": "a WRN"}.get(name, f"model {name!r}")
    raise ValueError(
      f"{loaded.path}: {what} has no timm ViT equivalent; export it with config.format=jaxlab "
      "(a plain state dict with jaxlab's names, see docs/interop.md)"
    )
  if model.get("distilled") and model.get("final_norm") != "tokens":
    raise ValueError(f"{loaded.path}: a distilled ViT with final_norm='pooled' has no timm equivalent")
  # materialized: a TLEG / soup parameterization exports its network; np.asarray views CPU arrays without a copy
  params = jax.tree.map(np.asarray, loaded.params)
  flat = trees.flatten({"params": params})
  entries = vit_maps.timm_entries(model, k)
  uncovered = sorted(set(flat) - {f"{e.collection}/{e.ours}" for e in entries})
  if uncovered:
    raise ValueError(
      f"{loaded.path}: parameters without a timm name: {', '.join(uncovered[:4])}; export with config.format=jaxlab"
    )
  kw = timm_kwargs(model, k, input_shape)
  if model.get("distilled"):
    kw["_class"] = "timm.models.deit.VisionTransformerDistilled"
  return names.export_tensors(flat, entries, int(model["depth"])), {"timm_kwargs": json.dumps(kw)}


_SAFETENSORS_CODES = {
  "float64": "F64",
  "float32": "F32",
  "float16": "F16",
  "bfloat16": "BF16",
  "int64": "I64",
  "int32": "I32",
  "int16": "I16",
  "int8": "I8",
  "uint8": "U8",
  "bool": "BOOL",
}


def write_safetensors(tensors: dict[str, np.ndarray], out: str, metadata: dict[str, str]) -> None:
  """Writes `tensors` (arrays or strided views) as a safetensors file, one tensor at a time, atomically.

  The layout is safetensors' own (u64 header size, JSON header with dtype / shape / data offsets and
  `__metadata__`, then the little-endian data without holes); `safetensors.safe_open` and timm read it. Writing
  it here rather than with `safetensors.numpy.save_file` lets a transposed view be copied to contiguous memory
  one tensor at a time, so exporting needs about one extra tensor of memory instead of a second copy of the
  model. The file is written under a temporary name and renamed into place, so a failure leaves nothing behind.
  """
  header: dict = {"__metadata__": {"format": "pt", **metadata}}
  offset = 0
  for k, v in tensors.items():
    name = np.dtype(v.dtype).name
    if name not in _SAFETENSORS_CODES:
      raise ValueError(f"tensor {k}: dtype {name} cannot be written to safetensors")
    header[k] = {"dtype": _SAFETENSORS_CODES[name], "shape": list(v.shape), "data_offsets": [offset, offset + v.nbytes]}
    offset += v.nbytes
  head = json.dumps(header, separators=(",", ":")).encode()
  head += b" " * (-len(head) % 8)
  tmp = out + ".tmp"
  try:
    with open(tmp, "wb") as f:
      f.write(struct.pack("<Q", len(head)))
      f.write(head)
      for v in tensors.values():
        v = np.asarray(v)
        if not v.flags.c_contiguous:
          v = names.copy_into(np.empty(v.shape, v.dtype), v)
        f.write(memoryview(v.astype(v.dtype.newbyteorder("<"), copy=False).reshape(-1).view(np.uint8)))
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


PTH_EXTENSIONS = (".pth", ".pt", ".bin")


def run_export(config, workdir: str) -> dict:
  """The `export` job: `config.checkpoint` -> `config.out` in timm or jaxlab naming: safetensors, or for timm
  naming also a PyTorch state dict (`.pth`, `.pt`, `.bin`: `torch.save`'s zip archive, written without torch)."""
  if not config.get("checkpoint"):
    raise ValueError("config.checkpoint: give the jaxlab checkpoint (workdir) to export")
  out = str(config.get("out") or "")
  ext = os.path.splitext(out)[1].lower()
  if ext not in (".safetensors", *PTH_EXTENSIONS):
    raise ValueError(
      f"config.out={out!r}: give a .safetensors file (or .pth / .pt / .bin for a PyTorch state dict) to write "
      "(timm loads either with pretrained_cfg_overlay=dict(file=...))"
    )
  if os.path.exists(out) and not config.get("overwrite", False):
    raise ValueError(f"config.out={out} exists; choose another file or set config.overwrite=True")
  if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
    raise FileNotFoundError(f"config.out={out}: directory {os.path.dirname(os.path.abspath(out))} does not exist")
  fmt = str(config.get("format", "timm"))
  if fmt not in ("timm", "jaxlab"):
    raise ValueError(f"config.format={fmt!r}: choose timm or jaxlab")
  if fmt == "jaxlab" and ext != ".safetensors":
    raise ValueError(
      f"config.out={out!r}: config.format=jaxlab writes .safetensors only (the checkpoint's meta, which the "
      "import job reads back, travels in its metadata)"
    )
  step = int(config.get("step", -1))
  loaded = checkpoint.load(str(config.checkpoint), None if step < 0 else step, host=True)
  tensors, metadata = export_tensors(loaded, fmt)
  if ext == ".safetensors":
    write_safetensors(tensors, out, metadata)
  else:  # a plain state dict has no place for metadata: the timm arguments are in export.json only
    pth.write_state_dict(tensors, out)
  report = {
    "checkpoint": os.path.abspath(str(config.checkpoint)),
    "step": loaded.step,
    "format": fmt,
    "out": os.path.abspath(out),
    "sha256": readers.sha256(out),
    "tensors": len(tensors),
  }
  if "timm_kwargs" in metadata:
    kw = json.loads(metadata["timm_kwargs"])
    report["timm_kwargs"] = kw
    # num_classes in the overlay: timm drops a pretrained head whose class count differs from its default cfg
    name = "deit_*_distilled_*" if kw.get("_class") else "vit_* / deit*"
    report["timm_usage"] = (
      f"timm.create_model(<a {name} name>, pretrained=True, pretrained_cfg_overlay=dict(file="
      f"{os.path.abspath(out)!r}, num_classes={kw['num_classes']}), **timm_kwargs)"
    )
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "export.json"), "w") as f:
    json.dump(report, f, indent=2)
  return {"workdir": os.path.abspath(workdir), "out": report["out"], "format": fmt, "tensors": len(tensors)}
