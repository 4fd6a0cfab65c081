"""Offline transform jobs: validate, check and load inputs, transform, write a new checkpoint.

    python -m jaxlab.main --config=ml_collections_configs/transform.py:uniform_soup \
        --config.inputs=runs/a,runs/b,runs/c --workdir=runs/soup

Order of work, so that a bad job fails before any weights are read:
  1. the transform name and its arguments are validated against the schema;
  2. the inputs are resolved (missing checkpoint -> clear error) and the output
     workdir is checked (not one of the inputs, not already a checkpoint);
  3. the input metas are read and, for `same_tree` transforms, the trainable
     trees rebuilt from meta alone (`jax.eval_shape`) are compared: differing
     trees are refused with the first differences listed; ingredients trained
     from different initialisations are allowed with a warning;
  4. the transform runs; a `streaming` transform gets a lazy `Inputs` sequence
     that loads one checkpoint per index, others get every input loaded;
  5. the output is written as an ordinary jaxlab checkpoint whose meta records
     the transform, its arguments, the inputs (path, step, content hash) and the
     code version. Inputs are opened read-only and never written.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence

import jax

from jaxlab import build, checkpoint, configs, sharding, trees
from jaxlab.transforms import registry


class DifferentInitWarning(UserWarning):
  """Inputs that were fine-tuned from different initialisations (soups of them are usually poor)."""


class Inputs(Sequence):
  """Input checkpoints whose weights are loaded only when indexed, one at a time.

  `inputs[i]` loads checkpoint `i` (a `checkpoint.Loaded`) and keeps no
  reference to it, so a transform that iterates once holds one input at a time.
  Metas are read eagerly (small JSON). Content hashes are computed when a
  checkpoint is loaded and remembered for provenance.

  Args:
    paths: checkpoint workdirs (or their `checkpoints` folders).
    shardings: optional `fn(tree) -> tree of shardings` used to place each
      loaded `theta` / `model_state` (e.g. FSDP rules over a mesh).

  Raises:
    CheckpointError: a path without a jaxlab checkpoint (before any weights are read).
  """

  def __init__(self, paths: Sequence[str], shardings=None):
    self.paths = [str(p) for p in paths]
    self.steps = [checkpoint.resolve(p)[1] for p in self.paths]
    self.metas = [checkpoint.load_meta(p, s) for p, s in zip(self.paths, self.steps)]
    self.hashes: dict[int, str] = {}
    self.num_loads = 0
    self._shardings = shardings

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    i = range(len(self))[i]
    loaded = checkpoint.load(self.paths[i], self.steps[i])
    self.num_loads += 1
    if self._shardings is not None:
      loaded.theta = jax.device_put(loaded.theta, self._shardings(loaded.theta))
      loaded.model_state = jax.device_put(loaded.model_state, self._shardings(loaded.model_state))
    if i not in self.hashes:
      self.hashes[i] = checkpoint.content_hash(loaded.theta)
    return loaded

  def abstract(self, i: int) -> dict:
    """`{'theta', 'model_state'}` ShapeDtypeStructs of input `i`, from its meta alone."""
    return checkpoint.abstract_weights(self.metas[i])

  def hash(self, i: int) -> str:
    """Content hash of input `i` (loads it if the transform never did)."""
    if i not in self.hashes:
      self[i]
    return self.hashes[i]


def input_metas(inputs) -> list[dict]:
  """The metas of `Inputs` or of a list of `checkpoint.Loaded`."""
  if isinstance(inputs, Inputs):
    return list(inputs.metas)
  return [ld.meta for ld in inputs]


def input_paths(inputs) -> list[str]:
  if isinstance(inputs, Inputs):
    return list(inputs.paths)
  return [str(getattr(ld, "path", f"input {i}")) for i, ld in enumerate(inputs)]


def _tree_of(inputs, i) -> dict:
  if isinstance(inputs, Inputs):
    return inputs.abstract(i)
  ld = inputs[i]
  tree = {"theta": ld.theta}
  if ld.model_state:
    tree["model_state"] = ld.model_state
  return tree


def init_signature(meta: dict) -> str:
  """Where a checkpoint's training started: `init_from <path>@<step>`, or `scratch seed=<s>`."""
  prov = meta.get("provenance") or {}
  if prov.get("init_from"):
    return f"init_from {prov['init_from']}@{prov.get('step', '?')}"
  if prov.get("transform"):
    inits = sorted({i.get("init", "?") for i in prov.get("inputs", [])})
    if len(inits) == 1 and inits[0] != "?":  # e.g. a soup of fine-tunes of one model keeps that model's init
      return inits[0]
    return f"transform {prov['transform']} of {' / '.join(inits)}"
  seed = (meta.get("config") or {}).get("seed", "?")
  return f"scratch seed={seed} model={json.dumps(meta.get('model', {}), sort_keys=True)}"


def check_inputs(t: registry.Transform, inputs) -> None:
  """Refuses inputs with differing trees (`same_tree` transforms); warns for different inits (`averages`).

  Args:
    t: the transform.
    inputs: `Inputs` (checked from meta alone, no weights read) or loaded checkpoints.

  Raises:
    trees.TreeMismatchError: listing the first differences and which inputs differ.
  """
  if not t.same_tree or len(inputs) < 2:
    return
  paths = input_paths(inputs)
  ref = _tree_of(inputs, 0)
  for i in range(1, len(inputs)):
    d = trees.diff(ref, _tree_of(inputs, i))
    if d:
      raise trees.mismatch_error(
          f"transform {t.name!r}: input {paths[i]} does not have the same parameter tree as {paths[0]}", d,
          "all inputs must be fine-tunes of the same architecture")
  sigs = [init_signature(m) for m in input_metas(inputs)]
  if t.averages and len(set(sigs)) > 1:
    groups: dict[str, list[str]] = {}
    for p, s in zip(paths, sigs):
      groups.setdefault(s, []).append(os.path.basename(os.path.normpath(p)))
    listing = "; ".join(f"{s}: {', '.join(ps[:3])}{' ...' if len(ps) > 3 else ''}" for s, ps in groups.items())
    warnings.warn(f"transform {t.name!r}: inputs come from {len(groups)} different initialisations ({listing}); "
                  "weight averaging assumes fine-tunes of one pre-trained model and may give a poor model",
                  DifferentInitWarning, stacklevel=3)


def apply(name: str, inputs, args: dict | None = None) -> registry.Output:
  """Validates `args` and applies transform `name` in memory (nothing is written).

  Args:
    name: a registered transform.
    inputs: loaded checkpoints (`checkpoint.Loaded`), checkpoint paths (loaded one
      at a time for streaming transforms), or an `Inputs`.
    args: the transform's arguments; defaults are filled in from its schema.

  Returns:
    The transform's `Output`.

  Raises:
    ValueError: bad arguments, wrong number of inputs, or (for `same_tree`
      transforms) inputs whose trees differ, listing the first differences.
  """
  t = registry.get(name)
  if not isinstance(inputs, Inputs):
    inputs = list(inputs)
  args = t.validate(dict(args or {}), len(inputs))
  if not isinstance(inputs, Inputs) and all(isinstance(p, str) for p in inputs):
    inputs = Inputs(inputs)
  check_inputs(t, inputs)
  metas = input_metas(inputs)
  if not t.streaming and isinstance(inputs, Inputs):
    inputs = list(inputs)
  out = t.fn(inputs, **args)
  for key in ("model", "parameterization"):  # callers (train._init_from) rebuild the model from these
    if key not in out.meta and metas and key in metas[0]:
      out.meta[key] = metas[0][key]
  return out


def split_paths(values) -> list[str]:
  """Checkpoint paths from a config string or tuple: comma separated, `(a,b)` and quotes allowed, blanks dropped."""
  return list(configs.as_paths(values))


def check_output_dir(workdir: str, paths: Sequence[str]) -> None:
  """Raises ValueError when the output workdir is (inside) an input or already holds a checkpoint."""
  out_abs = os.path.abspath(workdir)
  for p in paths:
    p_abs = os.path.abspath(os.path.expanduser(p))
    cdir = checkpoint.checkpoint_dir(p)
    owner = os.path.dirname(cdir) if os.path.basename(cdir) == checkpoint.CKPT_SUBDIR else cdir
    inside = os.path.commonpath([out_abs, cdir]) == cdir
    if out_abs in (p_abs, owner) or inside:
      raise ValueError(f"--workdir={workdir} is the input checkpoint {p}; write the output somewhere else "
                       "(inputs are never modified)")
  out_ckpt = os.path.join(out_abs, checkpoint.CKPT_SUBDIR)
  if os.path.isdir(out_ckpt) and os.listdir(out_ckpt):
    raise ValueError(f"--workdir={workdir} already holds a checkpoint; choose an empty output directory")


def _placement(config):
  """`fn(tree) -> shardings` from `config.sharding` (num_devices, fsdp), or None for default placement."""
  sh = config.get("sharding") if hasattr(config, "get") else None
  if not sh or not (sh.get("num_devices") or sh.get("fsdp")):
    return None
  mesh = sharding.make_mesh(int(sh.get("num_devices") or 0) or None)
  rules = tuple(tuple(r) for r in sh.get("fsdp", ()))
  return lambda tree: sharding.param_shardings(tree, mesh, rules)


def run(config, workdir: str) -> dict:
  """Runs `config.transform` over `config.inputs` and writes the result to `workdir`.

  Args:
    config: `transform` (name), `inputs` (checkpoint workdirs), `args` (the
      transform's arguments), optional `sharding.num_devices` / `sharding.fsdp`
      to place the inputs on a device mesh.
    workdir: the output workdir (a new checkpoint at step 0 is written there).

  Returns:
    `{'workdir', 'transform', 'report', 'inputs'}`.

  Raises:
    ValueError: unknown transform, bad arguments, no inputs, output workdir among
      the inputs or already a checkpoint, inputs with differing trees.
    CheckpointError: a missing or unreadable input checkpoint.
  """
  t = registry.get(config.get("transform", ""))
  paths = split_paths(config.get("inputs"))
  args = t.validate(build.to_dict(config.get("args")), len(paths))
  check_output_dir(workdir, paths)
  inputs = Inputs(paths, shardings=_placement(config))
  check_inputs(t, inputs)
  out = t.fn(inputs if t.streaming else list(inputs), **args)
  if not isinstance(out, registry.Output):
    raise TypeError(f"transform {t.name!r} returned {type(out).__name__}, not transforms.Output")
  meta = write_output(workdir, t, args, inputs, out)
  return {"workdir": os.path.abspath(workdir), "transform": t.name, "report": out.report,
          "inputs": meta["provenance"]["inputs"]}


def provenance(t: registry.Transform, args: dict, inputs: Inputs, report: dict) -> dict:
  """The provenance record of a transform output: transform, arguments, inputs, code version."""
  return {
      "transform": t.name,
      "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in args.items()},
      "inputs": [{"path": os.path.abspath(p), "step": s, "hash": inputs.hash(i), "init": init_signature(m)}
                 for i, (p, s, m) in enumerate(zip(inputs.paths, inputs.steps, inputs.metas))],
      "code": checkpoint.code_version(),
      "report": report,
  }


def write_output(workdir: str, t: registry.Transform, args: dict, inputs, out: registry.Output) -> dict:
  """Writes `out` as a step-0 checkpoint in `workdir` with provenance; returns its meta."""
  if not isinstance(inputs, Inputs):
    raise TypeError("write_output needs engine.Inputs (paths), not loaded checkpoints")
  meta = dict(inputs.metas[0])
  meta.update(out.meta)
  meta["step"] = 0
  meta["metrics"] = {}
  meta["provenance"] = provenance(t, args, inputs, to_jsonable(out.report))
  meta["versions"] = checkpoint.versions()
  theta = jax.device_get(out.theta)
  checkpoint.save_weights(workdir, 0, theta, meta, jax.device_get(out.model_state))
  return meta


def to_jsonable(x):
  """Numbers, lists and dicts only (numpy/jax scalars and arrays converted), for JSON."""
  if isinstance(x, dict):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
    return x.item()
  if hasattr(x, "tolist"):
    return x.tolist()
  return x
